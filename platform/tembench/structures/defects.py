"""Lattice defects: the elastic displacement field of a straight edge dislocation.

Isotropic linear elasticity (Hirth & Lothe, *Theory of Dislocations*, eqs 3-45/3-46), as
Atomsk's ``-dislocation`` option applies it: dislocation line along z, Burgers vector b
along x, glide plane normal along y, core at (x0, y0):

    u_x = b/2π [θ + x y / (2(1−ν) r²)]
    u_y = −b/2π [(1−2ν)/(4(1−ν)) ln(r²/b²) + (x² − y²) / (4(1−ν) r²)]

with θ = atan2(y, x) ∈ (−π, π]: the cut is the half-plane x < 0, y = 0, across which u_x
jumps by b (a lattice vector, so the crystal stays perfect there), leaving one extra
half-plane of atoms above the glide plane (y > 0).
"""

from __future__ import annotations

import numpy as np


def edge_dislocation_displacement(x_A: np.ndarray, y_A: np.ndarray, burgers_A: float,
                                  poisson_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(u_x, u_y) in Å at points (x, y) relative to the dislocation core."""
    x = np.asarray(x_A, dtype=np.float64)
    y = np.asarray(y_A, dtype=np.float64)
    b, nu = float(burgers_A), float(poisson_ratio)
    r2 = np.maximum(x * x + y * y, 1e-12)
    theta = np.arctan2(y, x)
    ux = b / (2 * np.pi) * (theta + x * y / (2 * (1 - nu) * r2))
    uy = -b / (2 * np.pi) * ((1 - 2 * nu) / (4 * (1 - nu)) * np.log(r2 / b**2) + (x * x - y * y) / (4 * (1 - nu) * r2))
    return ux, uy
