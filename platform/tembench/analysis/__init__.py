"""Analysis algorithms shared by components (library code, no component boilerplate).

- :mod:`tembench.analysis.atom_tracing`: 3D atom tracing (Ren 2020 §2.6), species
  classification by a Gaussian mixture, one-to-one matching to ground truth.

The names below are imported on first use (PEP 562): the tracer pulls in scipy.ndimage,
scipy.optimize and scikit-learn, which ``tembench list`` / ``validate`` must not pay for.
"""

__all__ = ["TraceResult", "classify_species", "dog_filter", "match_sites", "render_sites", "trace_atoms"]


def __getattr__(name: str):
    if name in __all__:
        from tembench.analysis import atom_tracing

        return getattr(atom_tracing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
