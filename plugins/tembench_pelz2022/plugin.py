"""Hook implementations of the Pelz 2022 plugin (entry point ``pelz2022``)."""

from __future__ import annotations

from tembench import hookimpl
from tembench_pelz2022.dpc import DPC, ICOM
from tembench_pelz2022.ssb import SSB
from tembench_pelz2022.virtual import VirtualDetector


@hookimpl
def tembench_register_reconstructors():
    return [SSB, DPC, ICOM, VirtualDetector]
