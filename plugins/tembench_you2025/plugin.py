"""Hook implementations of the You 2025 plugin (entry point ``you2025``)."""

from __future__ import annotations

from tembench import hookimpl
from tembench_you2025.msp import MSP


@hookimpl
def tembench_register_reconstructors():
    return [MSP]
