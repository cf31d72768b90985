"""Hook implementations of the Friedrich 2023 plugin (entry point ``friedrich2023``)."""

from __future__ import annotations

from tembench import hookimpl


@hookimpl
def tembench_register_reconstructors():
    return []
