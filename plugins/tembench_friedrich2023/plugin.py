"""Hook implementations of the Friedrich 2023 plugin (entry point ``friedrich2023``)."""

from __future__ import annotations

from tembench import hookimpl
from tembench_friedrich2023.airpi import AIRPIReconstructor  # imports jax only when it runs
from tembench_friedrich2023.dislocation import DislocationField
from tembench_friedrich2023.quantify import ColumnFit, ColumnFitScore, CRLBPrecision
from tembench_friedrich2023.restore import CNNRestore  # imports jax only when the step runs
from tembench_friedrich2023.ricom_recon import RiCOMReconstructor


@hookimpl
def tembench_register_reconstructors():
    return [ColumnFit, RiCOMReconstructor,
            AIRPIReconstructor]


@hookimpl
def tembench_register_quantifiers():
    return [ColumnFitScore, CRLBPrecision, DislocationField]


@hookimpl
def tembench_register_noise_models():
    return [CNNRestore]


@hookimpl
def tembench_report_sections(table, scenario, run_dir):
    from tembench_friedrich2023.report import report_sections

    return report_sections(table, scenario, run_dir)
