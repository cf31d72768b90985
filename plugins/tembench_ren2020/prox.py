"""Proximal operators of Ren 2020 §2.5 (Alg. 3 line 12) for a real potential volume in V.

Each ``prox_*(x, lam)`` returns argmin_v ½‖v − x‖² + lam·R(v) (+ the indicator of v ≥ 0 when
``positivity``), i.e. prox_{α τ R} with lam = α·τ in the units of the volume (V). The volume is
always real (float32), so Ren's "real" constraint holds by construction.

* positivity: projection onto v ≥ 0 (Ren's "positivity & real").
* LASSO, R = ‖v‖₁: soft threshold (closed form); with positivity max(x − lam, 0).
* 3D isotropic TV, R = Σ |∇v| with forward differences and Neumann (mirror) boundaries — the
  definition scikit-image's ``denoise_tv_chambolle`` uses, whose ``weight`` is exactly lam (it
  minimises ½‖v − x‖² + weight·TV(v); checked in the tests). Solved by Beck & Teboulle's
  fast gradient projection on the dual (FGP, Ren ref. [67]; Ren's code: 15 iterations, dual
  step 1/12 = 1/‖∇‖², the positivity projection inside, as the constrained variant of FGP). We
  use our own FGP rather than scikit-image because it supports the positivity constraint
  inside the prox (skimage's denoiser has none), runs on cupy, and needs 8 volumes of work
  memory instead of ≈ 12.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from tembench import _jit
from tembench.backend import get_array_module
from tembench.errors import TembenchError

REGULARIZERS = ("none", "lasso", "tv")

# a fused numba kernel (plugins/tembench_ren2020/_prox_nb.py: one sweep per FGP iteration instead of ≈ 40 array
# passes) gives the same bits as the array version here; it is imported only once a process has spent numba's start in
# the array version (tembench._jit)
HAVE_NUMBA = _jit.numba_enabled()


def prox_positivity(x, out=None):
    """Projection onto {v ≥ 0}."""
    xp = get_array_module(x)
    return xp.maximum(x, 0, out=out)


def prox_lasso(x, lam: float, positivity: bool = True, out=None):
    """prox of lam·‖v‖₁ (+ v ≥ 0): sign(x)·max(|x| − lam, 0), or max(x − lam, 0) with positivity."""
    xp = get_array_module(x)
    lam = x.dtype.type(lam) if hasattr(x, "dtype") else lam
    if positivity:
        out = xp.subtract(x, lam, out=out)
        return xp.maximum(out, 0, out=out)
    mag = xp.maximum(xp.abs(x) - lam, 0)
    return xp.multiply(xp.sign(x), mag, out=out)


def tv_norm(v) -> float:
    """Isotropic TV Σ_voxels sqrt(Σ_axes (forward difference)²), Neumann boundary (float64 sum)."""
    xp = get_array_module(v)
    sq = xp.zeros(v.shape, dtype=xp.float64)
    for ax in range(v.ndim):
        d = xp.diff(v.astype(xp.float64), axis=ax)
        sl = [slice(None)] * v.ndim
        sl[ax] = slice(0, -1)
        sq[tuple(sl)] += d * d
    return float(xp.sqrt(sq).sum())


def _axis_slices(ndim, ax, a, b):
    sl = [slice(None)] * ndim
    sl[ax] = slice(a, b)
    return tuple(sl)


def _primal(b, q, positivity, out):
    """out = P_C(b − ∇ᵀq) with ∇ᵀ the adjoint of the forward difference (q[ax] last plane ≡ 0).

    −∇ᵀq along ax is q[i] − q[i−1] (q[−1] = 0, q[n−1] = 0). The operations run in the fused kernel's order,
    b + q₀ + q₁ + q₂ and then the three shifted q subtracted, so both give the same bits."""
    xp = get_array_module(b)
    xp.add(b, q[0], out=out)
    for ax in range(1, b.ndim):
        out += q[ax]
    for ax in range(b.ndim):
        out[_axis_slices(b.ndim, ax, 1, None)] -= q[ax][_axis_slices(b.ndim, ax, 0, -1)]
    if positivity:
        xp.maximum(out, 0, out=out)
    return out


def _use_kernel(x, xp, use_numba):
    return xp is np and x.ndim == 3 and _jit.use_compiled(use_numba)


def prox_tv(x, lam: float, n_iter: int = 15, positivity: bool = True, use_numba: bool | None = None):
    """prox of lam·TV(v) (+ v ≥ 0) by FGP on the dual (Beck & Teboulle 2009), ``n_iter`` iterations.

    Dual variables are stored scaled by lam (|q| ≤ lam) so that v = P_C(x − ∇ᵀq). Work memory:
    two 3-component duals, the primal and one scratch volume (8 float32 volumes). A 3D numpy volume
    may run a fused numba kernel instead (``use_numba``: None = once numba pays for its start in this
    process, :mod:`tembench._jit`; True / False force it): the same operations in the same order, in one
    sweep per step with the primal in a 2-plane buffer (7 volumes of work memory) — the same bits.
    """
    xp = get_array_module(x)
    if lam < 0:
        raise TembenchError(f"prox_tv: the TV weight lam = α·τ must be >= 0 V; got {lam}")
    x = xp.asarray(x, dtype=xp.float32)
    if lam == 0 or n_iter < 1:
        v = x.copy()
        return xp.maximum(v, 0, out=v) if positivity else v
    nd = x.ndim
    step = np.float32(1.0 / (4.0 * nd))           # 1/‖∇‖² (= 1/12 in 3D)
    lam32 = np.float32(lam)
    inv_lam = np.float32(1.0) / lam32
    p = xp.zeros((nd,) + x.shape, dtype=xp.float32)   # p_k
    q = xp.zeros_like(p)                               # extrapolated r_k, then p_{k+1}
    if _use_kernel(x, xp, use_numba):
        from tembench_ren2020 import _prox_nb

        # one fused sweep per step; the primal lives in a 2-plane rolling buffer (7 volumes of work memory)
        x = xp.ascontiguousarray(x)
        t = 1.0
        planes = np.empty((2,) + x.shape[1:], np.float32)
        for _ in range(int(n_iter)):
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            _prox_nb._fgp_step_nb(x, q, p, step, inv_lam, np.float32((t - 1.0) / t_next), bool(positivity), planes)
            t = t_next
        del q
        v = np.empty_like(x)
        _prox_nb._primal_nb(x, p, bool(positivity), v)
        return v
    with _jit.twin_timer() if (xp is np and nd == 3 and HAVE_NUMBA) else contextlib.nullcontext():
        v = xp.empty_like(x)
        tmp = xp.empty_like(x)                             # scratch of the array version only
        t = 1.0
        for _ in range(int(n_iter)):
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            gamma = np.float32((t - 1.0) / t_next)
            t = t_next
            _primal(x, q, positivity, v)
            # a = proj_{|a| ≤ lam}(q + step·∇v), written into q
            for ax in range(nd):
                lo, hi = _axis_slices(nd, ax, 0, -1), _axis_slices(nd, ax, 1, None)
                d = tmp[lo]
                xp.subtract(v[hi], v[lo], out=d)
                d *= step
                q[ax][lo] += d
            xp.multiply(q[0], q[0], out=tmp)
            for ax in range(1, nd):
                xp.multiply(q[ax], q[ax], out=v)      # v is free until the next primal step
                tmp += v
            xp.sqrt(tmp, out=tmp)
            tmp *= inv_lam
            xp.maximum(tmp, np.float32(1.0), out=tmp)  # dividing by exactly 1 leaves a short a unchanged
            q /= tmp[None]
            # Nesterov: q ← a + γ(a − p_k), p ← a (p_{k+1}), one component at a time
            for ax in range(nd):
                xp.subtract(q[ax], p[ax], out=tmp)
                tmp *= gamma
                p[ax][...] = q[ax]
                q[ax] += tmp
        del q
        return _primal(x, p, positivity, v)


def apply_prox(x, regularizer: str, lam: float, positivity: bool = True, tv_iterations: int = 15):
    """Alg. 3 line 12: V = prox(U) for ``regularizer`` in {none, lasso, tv}, with or without v ≥ 0.

    Table 1's "Positive" row is ``regularizer="none", positivity=True``. Returns a new array
    (``x`` is left untouched).
    """
    if regularizer not in REGULARIZERS:
        raise TembenchError(f"regularizer must be one of {REGULARIZERS}; got {regularizer!r}")
    if regularizer == "tv":
        return prox_tv(x, lam, tv_iterations, positivity)
    if regularizer == "lasso":
        return prox_lasso(x, lam, positivity)
    if positivity:
        return prox_positivity(x)
    return x.copy()
