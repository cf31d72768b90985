"""Analysis algorithms shared by components (library code, no component boilerplate).

- :mod:`tembench.analysis.atom_tracing`: 3D atom tracing (Ren 2020 §2.6), species
  classification by a Gaussian mixture, one-to-one matching to ground truth.
"""

from tembench.analysis.atom_tracing import (
    TraceResult,
    classify_species,
    dog_filter,
    match_sites,
    render_sites,
    trace_atoms,
)

__all__ = ["TraceResult", "classify_species", "dog_filter", "match_sites", "render_sites", "trace_atoms"]
