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

import math
import os

import numpy as np

from tembench.backend import get_array_module
from tembench.errors import TembenchError

REGULARIZERS = ("none", "lasso", "tv")

try:  # optional: a fused CPU kernel for the TV prox (one sweep per FGP iteration instead of ≈ 45 array passes)
    if os.environ.get("TEMBENCH_NO_NUMBA", "") not in ("", "0"):
        raise ImportError("disabled by TEMBENCH_NO_NUMBA")
    import numba as _nb  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the environment
    _nb = None

HAVE_NUMBA = _nb is not None


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


def _primal(b, q, positivity, out, tmp):
    """out = P_C(b − ∇ᵀq) with ∇ᵀ the adjoint of the forward difference (q[ax] last plane ≡ 0)."""
    xp = get_array_module(b)
    out[...] = b
    for ax in range(b.ndim):
        # −∇ᵀq along ax: q[i] − q[i−1], with q[−1] = 0 and q[n−1] = 0
        out += q[ax]
        out[_axis_slices(b.ndim, ax, 1, None)] -= q[ax][_axis_slices(b.ndim, ax, 0, -1)]
    if positivity:
        xp.maximum(out, 0, out=out)
    return out


if HAVE_NUMBA:
    # serial on purpose: with prange, a busy 2-core machine made a pass 40× slower (7 ms vs 0.2 ms)
    # while its threads waited for each other; serial at 96³: 10 ms per 15-iteration prox vs 65 ms
    # for the array version.
    @_nb.njit(cache=True, nogil=True)
    def _primal_plane_nb(x, q, i, positivity, out):  # pragma: no cover - compiled
        ny, nx = out.shape
        zero = np.float32(0.0)
        for j in range(ny):
            for k in range(nx):
                s = x[i, j, k] + q[0, i, j, k] + q[1, i, j, k] + q[2, i, j, k]
                if i > 0:
                    s -= q[0, i - 1, j, k]
                if j > 0:
                    s -= q[1, i, j - 1, k]
                if k > 0:
                    s -= q[2, i, j, k - 1]
                if positivity and s < zero:
                    s = zero
                out[j, k] = s

    @_nb.njit(cache=True, nogil=True)
    def _primal_nb(x, q, positivity, out):  # pragma: no cover - compiled
        for i in range(x.shape[0]):
            _primal_plane_nb(x, q, i, positivity, out[i])

    @_nb.njit(cache=True, nogil=True)
    def _fgp_step_nb(x, q, p, step, inv_lam, gamma, positivity, planes):  # pragma: no cover - compiled
        # = a full primal pass, then the dual step and momentum: plane i + 1 of the primal is formed (from the old duals) before
        # the duals of plane i are overwritten, which is all the dual step of plane i reads
        nz, ny, nx = x.shape
        one = np.float32(1.0)
        cur = 0
        _primal_plane_nb(x, q, 0, positivity, planes[0])
        for i in range(nz):
            nxt = 1 - cur
            if i < nz - 1:
                _primal_plane_nb(x, q, i + 1, positivity, planes[nxt])
            vc = planes[cur]
            vn = planes[nxt]
            for j in range(ny):
                for k in range(nx):
                    c = vc[j, k]
                    a0 = q[0, i, j, k]
                    a1 = q[1, i, j, k]
                    a2 = q[2, i, j, k]
                    if i < nz - 1:
                        a0 += (vn[j, k] - c) * step
                    if j < ny - 1:
                        a1 += (vc[j + 1, k] - c) * step
                    if k < nx - 1:
                        a2 += (vc[j, k + 1] - c) * step
                    nrm = np.float32(math.sqrt(a0 * a0 + a1 * a1 + a2 * a2)) * inv_lam
                    if nrm > one:
                        a0 /= nrm
                        a1 /= nrm
                        a2 /= nrm
                    q[0, i, j, k] = a0 + gamma * (a0 - p[0, i, j, k])
                    q[1, i, j, k] = a1 + gamma * (a1 - p[1, i, j, k])
                    q[2, i, j, k] = a2 + gamma * (a2 - p[2, i, j, k])
                    p[0, i, j, k] = a0
                    p[1, i, j, k] = a1
                    p[2, i, j, k] = a2
            cur = nxt


def _use_kernel(x, xp, use_numba):
    ok = HAVE_NUMBA and xp is np and x.ndim == 3
    return ok if use_numba is None else (bool(use_numba) and ok)


def prox_tv(x, lam: float, n_iter: int = 15, positivity: bool = True, use_numba: bool | None = None):
    """prox of lam·TV(v) (+ v ≥ 0) by FGP on the dual (Beck & Teboulle 2009), ``n_iter`` iterations.

    Dual variables are stored scaled by lam (|q| ≤ lam) so that v = P_C(x − ∇ᵀq). Work memory:
    two 3-component duals, the primal and one scratch volume (8 float32 volumes). A 3D numpy volume
    uses a fused numba kernel when numba is installed (``use_numba``: None = when available): the same
    iteration in one sweep per step with the primal in a 2-plane buffer (7 volumes of work memory;
    equal to the array version to float32 rounding).
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
    p = xp.zeros((nd,) + x.shape, dtype=xp.float32)   # p_k
    q = xp.zeros_like(p)                               # extrapolated r_k, then p_{k+1}
    if _use_kernel(x, xp, use_numba):
        # one fused sweep per step; the primal lives in a 2-plane rolling buffer (7 volumes of work memory)
        x = xp.ascontiguousarray(x)
        t = 1.0
        inv_lam = np.float32(1.0) / lam32
        planes = np.empty((2,) + x.shape[1:], np.float32)
        for _ in range(int(n_iter)):
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            _fgp_step_nb(x, q, p, step, inv_lam, np.float32((t - 1.0) / t_next), bool(positivity), planes)
            t = t_next
        del q
        v = np.empty_like(x)
        _primal_nb(x, p, bool(positivity), v)
        return v
    v = xp.empty_like(x)
    tmp = xp.empty_like(x)                             # scratch of the array version only
    t = 1.0
    for _ in range(int(n_iter)):
        _primal(x, q, positivity, v, tmp)
        # q ← proj_{|q| ≤ lam}(q + step·∇v)
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
        tmp *= np.float32(1.0) / lam32
        xp.maximum(tmp, np.float32(1.0), out=tmp)
        q /= tmp[None]
        # Nesterov: p ← p_{k+1}, q ← p_{k+1} + γ(p_{k+1} − p_k), in place
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        gamma = np.float32((t - 1.0) / t_next)
        t = t_next
        p -= q                  # p_k − p_{k+1}
        for ax in range(nd):    # q ← q − γ·p, one component at a time (no 3-volume temporary)
            xp.multiply(p[ax], gamma, out=tmp)
            q[ax] -= tmp
        p *= gamma
        p += q                  # p_{k+1}
    del q
    return _primal(x, p, positivity, v, tmp)


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
