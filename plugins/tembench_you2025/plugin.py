"""Hook implementations of the You 2025 plugin (entry point ``you2025``)."""

from __future__ import annotations

from tembench import hookimpl
from tembench_you2025.e2e import E2EPtychoTomo
from tembench_you2025.linear_tomo import JointLinearTomo
from tembench_you2025.msp import MSP
from tembench_you2025.positions import MSPPositions, MSPState
from tembench_you2025.tilt_series import STEM4DTiltSeries
from tembench_you2025.tomo_scores import AlignmentError, DepthElongation, TomoAtomTracing, TomoFSC


@hookimpl
def tembench_register_forward_models():
    return [STEM4DTiltSeries]


@hookimpl
def tembench_register_reconstructors():
    return [MSP, JointLinearTomo, E2EPtychoTomo]


@hookimpl
def tembench_register_quantifiers():
    return [MSPPositions, MSPState, AlignmentError, DepthElongation, TomoFSC, TomoAtomTracing]


@hookimpl
def tembench_report_sections(table, scenario, run_dir):
    from tembench_you2025.report import report_sections
    from tembench_you2025.tomo_report import tomo_report_sections

    return report_sections(table, scenario, run_dir) + tomo_report_sections(table, scenario, run_dir)
