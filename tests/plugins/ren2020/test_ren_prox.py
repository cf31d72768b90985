"""Proximal operators of Ren 2020 §2.5 against closed forms and an independent TV solver."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.restoration import denoise_tv_chambolle

from tembench.errors import TembenchError
from tembench_ren2020.prox import apply_prox, prox_lasso, prox_positivity, prox_tv, tv_norm


def _objective(v, x, lam):
    return 0.5 * np.sum((v.astype(np.float64) - x) ** 2) + lam * tv_norm(v)


def test_positivity_and_lasso_closed_forms():
    x = np.linspace(-4, 4, 81, dtype=np.float32).reshape(3, 3, 9)
    np.testing.assert_array_equal(prox_positivity(x), np.where(x > 0, x, 0))
    soft = np.sign(x) * np.maximum(np.abs(x) - 1.5, 0)
    np.testing.assert_allclose(prox_lasso(x, 1.5, positivity=False), soft, atol=1e-6)
    np.testing.assert_allclose(prox_lasso(x, 1.5, positivity=True), np.maximum(x - 1.5, 0), atol=1e-6)
    # the prox is the minimiser: no nearby point has a lower ½(v − x)² + λ|v| (elementwise)
    v = prox_lasso(x, 1.5, positivity=False)
    for dv in (-1e-2, 1e-2):
        f0 = 0.5 * (v - x) ** 2 + 1.5 * np.abs(v)
        f1 = 0.5 * (v + dv - x) ** 2 + 1.5 * np.abs(v + dv)
        assert np.all(f1 >= f0 - 1e-6)
    # apply_prox leaves its input alone
    y = x.copy()
    apply_prox(y, "lasso", 1.0)
    apply_prox(y, "none", 0.0, positivity=True)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_tv_prox_of_a_step_is_the_closed_form(axis):
    """A step along one axis (constant across the others): ROF moves each side by λ/n_side."""
    shape = [6, 7, 8]
    n = shape[axis]
    n1 = 3
    profile = np.where(np.arange(n) < n1, 1.0, 5.0)
    x = np.broadcast_to(profile.reshape([-1 if a == axis else 1 for a in range(3)]), shape).astype(np.float32)
    lam = 1.2                        # < jump · n1·n2/n: the two levels do not merge
    v = prox_tv(x, lam, n_iter=400, positivity=False)
    want = np.where(np.arange(n) < n1, 1.0 + lam / n1, 5.0 - lam / (n - n1))
    want = np.broadcast_to(want.reshape([-1 if a == axis else 1 for a in range(3)]), shape)
    np.testing.assert_allclose(v, want, atol=2e-3)
    # a constant volume is a fixed point; positivity clips a negative constant to 0
    np.testing.assert_allclose(prox_tv(np.full(shape, 2.5, np.float32), 3.0, 20, False), 2.5, atol=1e-6)
    np.testing.assert_allclose(prox_tv(np.full(shape, -2.5, np.float32), 3.0, 20, True), 0.0, atol=1e-6)


def test_tv_prox_matches_scikit_image_objective():
    """skimage's Chambolle denoiser minimises ½‖v − x‖² + weight·TV(v): weight = λ = α·τ."""
    rng = np.random.default_rng(0)
    x = (rng.random((14, 16, 18)) * 3).astype(np.float32)
    lam = 0.3
    ours = prox_tv(x, lam, n_iter=300, positivity=False)
    theirs = denoise_tv_chambolle(x, weight=lam, eps=1e-10, max_num_iter=3000)
    f_ours, f_theirs = _objective(ours, x, lam), _objective(theirs, x, lam)
    assert f_ours <= f_theirs * (1 + 1e-5)
    assert np.abs(ours - theirs).max() < 0.02
    # 15 iterations (Ren's setting) already land within 0.1 % of the optimum
    f15 = _objective(prox_tv(x, lam, n_iter=15, positivity=False), x, lam)
    assert f15 < f_ours * 1.001
    # the TV norm itself: a linear ramp along x has TV = slope · (n − 1) per row
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32) * 0.5, (2, 3, 5))
    assert tv_norm(ramp) == pytest.approx(0.5 * 4 * 6)


def test_tv_prox_with_positivity_is_the_constrained_minimiser():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(10, 11, 12)) * 2).astype(np.float32)
    lam = 0.5
    v = prox_tv(x, lam, n_iter=400, positivity=True)
    assert v.min() >= 0
    f = _objective(v, x, lam)
    # random feasible perturbations do not lower the objective
    for _ in range(20):
        w = np.maximum(v + 0.05 * rng.normal(size=v.shape).astype(np.float32), 0)
        assert _objective(w, x, lam) >= f - 1e-3
    # and it beats clipping the unconstrained solution
    assert f <= _objective(np.maximum(prox_tv(x, lam, 400, False), 0), x, lam) + 1e-3


def test_bad_input_is_rejected():
    with pytest.raises(TembenchError, match="regularizer"):
        apply_prox(np.zeros((2, 2, 2), np.float32), "l2", 1.0)
    with pytest.raises(TembenchError, match="lam"):
        prox_tv(np.zeros((2, 2, 2), np.float32), -1.0)


@pytest.mark.skipif(not __import__("tembench_ren2020.prox", fromlist=["HAVE_NUMBA"]).HAVE_NUMBA,
                    reason="numba not installed")
@pytest.mark.parametrize("positivity", [True, False])
@pytest.mark.parametrize("shape", [(9, 11, 13), (1, 6, 5), (4, 1, 7), (23, 17, 2)])
def test_tv_prox_numba_kernel_gives_the_array_versions_bits(positivity, shape):
    """Same bits, so which of the two runs (tembench._jit decides by time spent) never shows in a result. Fails
    with the array version's former order (each axis's q added and its shifted q subtracted in turn: 1e-6 off)."""
    rng = np.random.default_rng(3)
    x = (rng.random(shape) * 4 - 1).astype(np.float32)
    a = prox_tv(x, 0.7, n_iter=25, positivity=positivity, use_numba=False)
    b = prox_tv(x, 0.7, n_iter=25, positivity=positivity, use_numba=True)
    assert np.abs(a - x).max() > 0.1           # the prox did something
    np.testing.assert_array_equal(b, a)
