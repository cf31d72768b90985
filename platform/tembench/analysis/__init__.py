"""Analysis algorithms shared by components (library code, no component boilerplate).

- :mod:`tembench.analysis.atom_tracing`: 3D atom tracing (Ren 2020 §2.6), species
  classification by a Gaussian mixture, one-to-one matching to ground truth.
- :mod:`tembench.analysis.fsc`: Fourier shell / ring correlation on physical shells (1/Å),
  van Heel & Schatz one-bit / half-bit thresholds, resolution at the first crossing.

The names below are imported on first use (PEP 562): the tracer pulls in scipy.ndimage and
scipy.optimize, which ``tembench list`` / ``validate`` must not pay for.
"""

_ATOM_TRACING = ["TraceResult", "classify_species", "dog_filter", "match_sites", "render_sites", "trace_atoms"]
_FSC = ["FSCCurve", "Resolution", "fourier_ring_correlation", "fourier_shell_correlation", "halfbit_threshold",
        "hann_edge_mask", "information_threshold", "onebit_threshold", "resolution_at", "threshold_curve"]

__all__ = _ATOM_TRACING + _FSC


def __getattr__(name: str):
    if name in _ATOM_TRACING:
        from tembench.analysis import atom_tracing

        return getattr(atom_tracing, name)
    if name in _FSC:
        from tembench.analysis import fsc

        return getattr(fsc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
