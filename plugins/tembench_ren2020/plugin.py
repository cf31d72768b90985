"""Hook implementations of the Ren 2020 plugin (entry point ``ren2020``)."""

from __future__ import annotations

from tembench import hookimpl
from tembench_ren2020.reconstructor import MultisliceAET
from tembench_ren2020.table1 import report_section


@hookimpl
def tembench_register_reconstructors():
    return [MultisliceAET]


@hookimpl
def tembench_report_sections(table, scenario, run_dir):
    return report_section(table, scenario)
