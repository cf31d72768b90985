"""Every hook tembench calls. Each docstring is the hook's contract.

Hooks are called with keyword arguments only. Registration hooks are collected from every
plugin and merged by component ``name`` (a duplicate is an error naming both plugins).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from tembench.components import ForwardModel, NoiseModel, Quantifier, Reconstructor, SampleModel

hookspec = pluggy.HookspecMarker("tembench")


# --- registration: one hook per component kind --------------------------------------------
@hookspec
def tembench_register_samples() -> list[type[SampleModel]]:
    """Return the sample component classes this plugin provides."""


@hookspec
def tembench_register_forward_models() -> list[type[ForwardModel]]:
    """Return the forward-model component classes this plugin provides."""


@hookspec
def tembench_register_noise_models() -> list[type[NoiseModel]]:
    """Return the noise/distortion-model component classes this plugin provides."""


@hookspec
def tembench_register_reconstructors() -> list[type[Reconstructor]]:
    """Return the reconstructor component classes this plugin provides.

    If the noise chain ends with ``half_sets``, the runner also calls ``reconstruct`` on each half
    (see :func:`tembench.types.half_measurement`). A class that honours
    ``measurement.extras["pattern_mask"]`` (scattered probe positions) sets
    ``supports_pattern_mask = True``; otherwise ``split: positions`` is refused for it.
    """


@hookspec
def tembench_register_quantifiers() -> list[type[Quantifier]]:
    """Return the quantifier component classes this plugin provides.

    ``score`` finds the reconstructions of the two half sets (if any) in
    ``reconstruction.extras["half_sets"]``. A class with ``aggregates = True`` also gets
    ``aggregate(repeats, sample, params)`` once all repeats of a (point, reconstructor) are
    finished; its results go to the run's ``aggregates.parquet`` (docs/runner.md).
    """


# --- lifecycle ----------------------------------------------------------------------------
@hookspec
def tembench_point_finished(point: dict[str, Any], rows: list[dict[str, Any]], error: str | None) -> None:
    """Called in the runner's main process after a (point, repeat) unit has finished.

    :param point: the swept parameter values of the point, plus ``repeat`` and ``point_id``.
    :param rows: the result rows written for it (one per reconstructor).
    :param error: the error message if any stage failed, else None.
    """


@hookspec
def tembench_report_sections(table: pd.DataFrame, scenario: Any, run_dir: Any) -> list[dict[str, str]]:
    """Contribute sections to a run's report.

    :param table: the run's results table.
    :param scenario: the validated :class:`tembench.scenario.Scenario`.
    :param run_dir: :class:`pathlib.Path` of the run folder (artifacts live below it).
    :return: a list of ``{"title": str, "html": str, "markdown": str}``, each optionally with
        ``"placement"``: ``"top"`` (right after the verdict, before the core's results: what a reader
        should see first, e.g. images beside the truth) or ``"end"`` (the default: after the core's
        panels); return None or [] to add nothing.
    """
