"""AIRPI (Friedrich 2023 ch. 4): stitching (eqs 4.4–4.8), step weights (eq 4.10), frame conventions, and the
held-out comparison against the probe-only baseline and iCOM (the issue's done-when)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement
from tembench_friedrich2023 import airpi as A

E_KEV, ALPHA = 300.0, 20.0


def _truth_patches(phi, positions_px, margin, probe_k):
    """ψ_out(k) in the network's frame for an object phase φ(y, x) (callable, canvas px): ψ_in·exp(iφ)."""
    n = A.N_FRAME
    pin = A.to_real(probe_k)
    r = np.arange(n) - n // 2
    out = []
    for py, px in positions_px:
        yy = py + margin + r[:, None]
        xx = px + margin + r[None, :]
        out.append(A.to_fourier(pin * np.exp(1j * phi(yy, xx))))
    return np.array(out)


def test_stitching_exact_when_prediction_is_truth():
    """Eqs 4.6–4.8: ψ_out = ψ_in·T at every position ⇒ arg Σ_n T·ω_n = arg T exactly (positions on the canvas grid)."""
    p = A.frame_pixel_A(E_KEV, ALPHA)
    probe_k = A.probe_frame(E_KEV, ALPHA, {"C30": 1.0e4, "C10": -16.0})
    n = 48

    def phi(y, x):
        return 0.3 * np.sin(2 * np.pi * y / 7.3) + 0.2 * np.cos(2 * np.pi * (x + y) / 5.1) + 0.05 * (x % 3)

    st = A.Stitcher(((n - 1) * p, (n - 1) * p), p, probe_k)
    pos = [(i, j) for i in range(0, n, 3) for j in range(0, n, 3)]
    st.add(_truth_patches(phi, pos, st.margin, probe_k), np.array(pos, float) * p)
    ph, w = st.phase((n, n))
    yy, xx = np.mgrid[0:n, 0:n] + st.margin
    err = np.angle(np.exp(1j * (ph - phi(yy, xx))))
    assert (w > 0).mean() > 0.9
    assert np.abs(err[w > 0]).max() < 1e-5


def test_stitching_subpixel_positions_use_the_phase_factor():
    """Eq 4.4: positions between canvas pixels are placed by the phase ramp; a band-limited object comes back.

    Without the ramp (patches snapped to the nearest pixel) the error is the object's gradient × the offset,
    ≈ 0.2 rad here; with it the residual is the Fourier interpolation of the probe's tails (≪ 0.02 rad).
    """
    p = A.frame_pixel_A(E_KEV, ALPHA)
    probe_k = A.probe_frame(E_KEV, ALPHA, {"C30": 1.0e4, "C10": -16.0})
    n, step = 40, 1.37  # step in canvas px: every position sits between pixels

    def phi(y, x):  # spatial frequency well inside the frame's band (period ≥ 6 px)
        return 0.4 * np.sin(2 * np.pi * y / 9.0) + 0.3 * np.cos(2 * np.pi * x / 6.5)

    pos = [(i * step, j * step) for i in range(int(n / step) + 1) for j in range(int(n / step) + 1)]
    st = A.Stitcher((n * p, n * p), p, probe_k)
    m = st.margin
    r = np.arange(A.N_FRAME) - A.N_FRAME // 2
    pin = A.to_real(probe_k)
    waves = [A.to_fourier(pin * np.exp(1j * phi(py + m + r[:, None], px + m + r[None, :]))) for py, px in pos]
    st.add(np.array(waves), np.array(pos) * p)
    ph, w = st.phase((n, n))
    yy, xx = np.mgrid[0:n, 0:n] + m
    err = np.angle(np.exp(1j * (ph - phi(yy, xx))))
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(err[inner]).max() < 0.02


def test_patch_weight_eq_4_7():
    probe_k = A.probe_frame(E_KEV, ALPHA)
    pin = A.to_real(probe_k)
    w = A.patch_weight(pin[None])[0]
    i = np.abs(pin) ** 2
    assert np.all(w[i <= 0.1 * i.max()] == 0)
    on = i > 0.1 * i.max()
    np.testing.assert_allclose(w[on], i[on] / i.sum(), rtol=1e-6)


def test_step_weights_eq_4_10():
    """ζ_xy = 1/(Δs·50) next to the centre, ζ_d = 1/(√2·Δs·50) on the diagonal (the authors' code), centre 1."""
    for ds in (0.05, 0.2, 0.5):
        z = A.step_weights(ds)
        zxy, zd = 1 / (ds * 50), 1 / (np.sqrt(2) * ds * 50)
        np.testing.assert_allclose(z, [[zd, zxy, zd], [zxy, 1.0, zxy], [zd, zxy, zd]], rtol=1e-12)
    # the network input carries them: a kernel of identical patterns gives channels in the ratio of ζ
    probe_k = A.probe_frame(E_KEV, ALPHA)
    cbed = np.abs(probe_k) ** 2 * 7.0
    x = A.network_inputs(np.broadcast_to(cbed, (1, 3, 3, *cbed.shape)), probe_k, 0.2)[0]
    on = np.abs(probe_k) > 0.9999  # inside the aperture's soft edge
    np.testing.assert_allclose(x[4][on], 1.0, rtol=1e-5)   # counts·n_ap/⟨counts⟩ = |ψ_in|² = 1 in the disc
    np.testing.assert_allclose(x[1][on], 0.1, rtol=1e-5)
    np.testing.assert_allclose(x[0][on], 1 / (np.sqrt(2) * 10), rtol=1e-5)
    with pytest.raises(TembenchError, match="positive"):
        A.step_weights(0.0)


def test_rebin_is_block_binning_and_conserves_counts():
    rng = np.random.default_rng(0)
    data = rng.random((64, 64))
    # data pixel 1 mrad, centre at 32; frame pixel 2 mrad, centre frame pixel 16 ↔ angle 0 (edges at ±1 mrad)
    ry = A.rebin_matrix(64, 32.0, 1.0, 2.0)
    binned = ry @ data @ ry.T
    # frame pixel j spans data pixels (j − 16)·2 + 32 − 1 + [−0.5 … 1.5]: half of pixel 31+2(j−16), all of 32+…, half of 33+…
    j = 20
    lo = 32 + 2 * (j - 16) - 1
    ref = 0.5 * data[lo] + data[lo + 1] + 0.5 * data[lo + 2]
    np.testing.assert_allclose((ry @ data)[j], ref)
    # frame covers [−33, 31] mrad, the data [−32.5, 31.5]: every data pixel counts once except half of the last
    wt = np.ones(64)
    wt[63] = 0.5
    np.testing.assert_allclose(binned.sum(), wt @ data @ wt, rtol=1e-12)


def test_training_probe_matches_inference_probe():
    """The label of an empty window (multislice data generator) is the probe the reconstructor builds."""
    from tembench_friedrich2023 import airpi_train as T

    rng = np.random.default_rng(3)
    T_RECIPE = dict(T.RECIPE)
    try:
        T.RECIPE["vacuum_fraction"] = 1.0
        c = T.simulate_crystal(rng)
    finally:
        T.RECIPE.clear()
        T.RECIPE.update(T_RECIPE)
    ab = {"C30": T.RECIPE["C30_A"], "C10": T.scherzer_C10_A(c["energy_keV"], T.RECIPE["C30_A"])}
    pk = A.probe_frame(c["energy_keV"], c["semiangle_mrad"], ab)
    assert np.abs(c["probe"] - pk).max() < 1e-5
    assert np.abs(c["labels"] - pk[None]).max() < 1e-5
    # and stitching that probe as the exit wave gives a flat object
    st = A.Stitcher((1.0, 1.0), A.frame_pixel_A(c["energy_keV"], c["semiangle_mrad"]), pk)
    st.add(c["labels"][:4], np.array([[0, 0], [0, 0.5], [0.5, 0], [0.5, 0.5]]))
    ph, w = st.phase((4, 4))
    assert np.abs(ph).max() < 1e-5


def test_training_data_deterministic():
    from tembench_friedrich2023 import airpi_train as T

    a = T.make_dataset(2, 7, log=lambda m: None)
    b = T.make_dataset(2, 7, log=lambda m: None)
    for ca, cb in zip(a, b):
        assert ca["frames"].tobytes() == cb["frames"].tobytes()
        assert ca["labels"].tobytes() == cb["labels"].tobytes()
    x1 = T.sample_batch(a, np.random.default_rng(1), 4)[0]
    x2 = T.sample_batch(b, np.random.default_rng(1), 4)[0]
    assert x1.tobytes() == x2.tobytes()


def test_noise_draw_groups_and_the_loss_on_their_mean():
    """The v2 attempts' ``stitch`` term (airpi_train.make_loss): with ``draws`` noise draws of one sample in
    consecutive rows, it scores the object-phase error of the draws' *mean* phasor — the part of a patch's error
    the stitching cannot average away. A common offset c on every draw costs w·c²; offsets ±c that cancel over
    the draws cost nothing there, while the per-draw object L2 sees c² in both cases."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from tembench_friedrich2023 import airpi_train as T

    data = T.make_dataset(2, 7, log=lambda m: None)
    x, y, p = T.sample_batch(data, np.random.default_rng(3), 8, draws=4, low_dose_fraction=1.0)
    assert all(y[g * 4].tobytes() == y[g * 4 + k].tobytes() for g in range(2) for k in range(4))
    assert any(x[g * 4].tobytes() != x[g * 4 + 1].tobytes() for g in range(2))  # independent draws
    c = 0.3
    yk = y.astype(np.complex128)

    def fake(offsets):
        ph = np.angle(yk) + np.asarray(offsets)[:, None, None]
        return lambda params, x_: (jnp.asarray(np.abs(yk)), jnp.asarray(np.sin(ph)), jnp.asarray(np.cos(ph)))

    w = {**T.LOSS_WEIGHTS, "stitch": 5.0}
    w0 = dict(T.LOSS_WEIGHTS)
    args = (None, x, y.real, y.imag, p.real, p.imag)
    for offsets, expect in (([c] * 8, 5.0 * c * c), ([c, -c] * 4, 0.0)):
        with_term = float(T.make_loss(fake(offsets), w, draws=4)(*args)[0])
        without, parts = T.make_loss(fake(offsets), w0, draws=4)(*args)
        assert with_term - float(without) == pytest.approx(expect, abs=1e-4), offsets
        assert float(parts[4]) == pytest.approx(c * c, rel=1e-3)  # the per-draw object L2 sees both


def _random_phase_scans(rng, probe, steps_px, side):
    """One training "crystal" per step (frame px; half-pixel steps exercise the eq-4.4 ramp): a side × side scan of
    the probe through a random phase (σ 0.3 rad per pixel), as airpi_train stores it — frames |ψ(k)|², labels the
    interior exit waves."""
    pa = A.frame_pixel_A(E_KEV, ALPHA)
    data = []
    for step in steps_px:
        waves = A.to_fourier(A.to_real(probe)[None] * np.exp(1j * rng.normal(0, 0.3, (side * side, 32, 32))))
        data.append({"frames": (np.abs(waves) ** 2).reshape(side, side, 32, 32).astype(np.float32),
                     "labels": waves.reshape(side, side, 32, 32)[1:-1, 1:-1].reshape(-1, 32, 32).astype(np.complex64),
                     "probe": probe, "step_A": step * pa, "energy_keV": E_KEV, "semiangle_mrad": ALPHA})
    return data


def test_canvas_term_is_the_stitchers_error():
    """The session-7 attempt's stitched-field term (airpi_train.canvas_error, JAX) equals an independent numpy
    computation with the production Stitcher (eqs 4.4–4.8): per crystal, the 16 interior patches of the predicted
    and the true exit waves stitched, phase error minus its coverage-weighted mean, averaged with Σω/max Σω."""
    jax = pytest.importorskip("jax")
    from tembench_friedrich2023 import airpi_train as T

    rng = np.random.default_rng(0)
    probe = A.probe_frame(E_KEV, ALPHA, {"C30": 1.0e4, "C10": -16.0})
    pa = A.frame_pixel_A(E_KEV, ALPHA)
    data = _random_phase_scans(rng, probe, (1.5, 1.0), 6)
    x, y, p, ramp, om, offs = T.sample_scans(data, np.random.default_rng(1), 2, low_dose_fraction=1.0)
    off = rng.normal(0.0, 0.3, len(y))
    yk = y.astype(np.complex128)
    pred = yk * np.exp(1j * off)[:, None, None]  # a constant phase per patch: ψ_out(k)·e^{ic}
    got = float(jax.jit(T.canvas_term)(pred.astype(np.complex64), y, p, ramp.real, ramp.imag, om, offs))
    # the same with the numpy Stitcher, crystal by crystal (each group of 16 rows is one crystal's interior)
    expect = []
    for g in range(2):
        sl = slice(16 * g, 16 * g + 16)
        c = next(d for d in data if d["labels"].tobytes() == y[sl].tobytes())
        pa = A.frame_pixel_A(c["energy_keV"], c["semiangle_mrad"])
        rr, cc = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
        pos = np.stack([rr.ravel(), cc.ravel()], 1) * c["step_A"]
        phs = []
        for waves in (pred[sl], yk[sl]):
            st = A.Stitcher((3 * c["step_A"], 3 * c["step_A"]), pa, c["probe"])
            st.add(waves, pos)
            phs.append((st.T, st.W))
        (tp, w), (tt, _) = phs
        q = w / w.max()
        cov = w > 0
        e = np.angle(tp[cov] * np.conj(tt[cov]))
        e = e - np.sum(q[cov] * e) / q[cov].sum()
        expect.append(np.sum(q[cov] * e ** 2) / q[cov].sum())
    assert float(np.mean(expect)) > 1e-3
    assert got == pytest.approx(float(np.mean(expect)), rel=2e-3)


def test_canvas_ncc_term_is_the_stitched_fields_ncc():
    """Session 9's scale-free field term (airpi_train.canvas_error with ncc=True): per crystal of an 8 × 8 scan, the
    36 interior patches of prediction and truth stitched (eqs 4.4–4.8); 1 − the coverage-weighted NCC of the stitched
    predicted phase with the stitched true phase, against an independent numpy computation with the Stitcher. Zero
    when the prediction is the truth."""
    jax = pytest.importorskip("jax")
    from tembench_friedrich2023 import airpi_train as T

    rng = np.random.default_rng(2)
    probe = A.probe_frame(E_KEV, ALPHA, {"C30": 1.0e4, "C10": -16.0})
    pa = A.frame_pixel_A(E_KEV, ALPHA)
    data = _random_phase_scans(rng, probe, (1.5, 2.0), 8)
    _, y, p, ramp, om, offs = T.sample_scans(data, np.random.default_rng(1), 2, low_dose_fraction=1.0)
    assert len(y) == 72 and offs.max() <= T.canvas_size(8) - A.N_FRAME
    yk = y.astype(np.complex128)
    pred = A.to_fourier(A.to_real(yk) * np.exp(1j * rng.normal(0, 0.4, y.shape)))  # a noisy prediction
    term = jax.jit(T.canvas_term, static_argnums=(7, 8, 9))
    got = float(term(pred.astype(np.complex64), y, p, ramp.real, ramp.imag, om, offs, 36, T.canvas_size(8), True))
    exact = float(term(y, y, p, ramp.real, ramp.imag, om, offs, 36, T.canvas_size(8), True))
    sig = np.full(len(y), 1.2, np.float32)  # the learned smoothing of the predicted patches (--smooth)
    got_s = float(jax.jit(T.canvas_term, static_argnums=(7, 8, 9))(pred.astype(np.complex64), y, p, ramp.real,
                                                                     ramp.imag, om, offs, 36, T.canvas_size(8), True,
                                                                     sig))

    def expected(sigma):
        out = []
        for g in range(2):
            sl = slice(36 * g, 36 * g + 36)
            c = next(d for d in data if d["labels"].tobytes() == y[sl].tobytes())
            rr, cc = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
            pos = np.stack([rr.ravel(), cc.ravel()], 1) * c["step_A"]
            phs = []
            for waves, sg in ((pred[sl], sigma), (yk[sl], None)):
                st = A.Stitcher((5 * c["step_A"], 5 * c["step_A"]), pa, c["probe"])
                st.add(waves, pos, None if sg is None else sg[sl])
                phs.append((st.T, st.W))
            (tp, w), (tt, _) = phs
            cov = w > 0
            q = (w / w.max())[cov]
            a = np.angle(tt[cov] * np.conj(np.sum(q * tt[cov])))
            b = a + np.angle(tp[cov] * np.conj(tt[cov]))
            a, b = a - np.sum(q * a) / q.sum(), b - np.sum(q * b) / q.sum()
            out.append(1.0 - np.sum(q * a * b) / np.sqrt(np.sum(q * a * a) * np.sum(q * b * b)))
        return np.array(out)

    e0 = expected(None)
    assert 0.05 < e0.mean() < 0.9 and abs(e0[0] - e0[1]) > 0.01
    assert got == pytest.approx(e0.mean(), rel=2e-3)
    assert abs(exact) < 1e-4
    assert got_s == pytest.approx(expected(sig).mean(), rel=2e-3) and abs(got_s - got) > 0.01
    got_log = float(jax.jit(T.canvas_term, static_argnums=(7, 8, 9, 11))(
        pred.astype(np.complex64), y, p, ramp.real, ramp.imag, om, offs, 36, T.canvas_size(8), True, None, True))
    assert got_log == pytest.approx(float(np.mean(np.log(e0 + 1e-3))), rel=2e-3)  # --canvas-log


def test_learned_smoothing_is_a_gaussian_of_the_stitched_object():
    """The v2 attempt's smoothing: each patch's ω·T_patch convolved with a Gaussian of σ px before stitching is, by
    linearity, the stitched canvas convolved with it (scipy's Gaussian filter, independent), and σ follows
    exp(a + b·(L − 1.3)) of the dose level L."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(4)
    probe_k = A.probe_frame(E_KEV, ALPHA, {"C30": 1.0e4, "C10": -16.0})
    pa = A.frame_pixel_A(E_KEV, ALPHA)
    pin = A.to_real(probe_k)
    pos = np.array([(i * 1.0, j * 1.0) for i in range(12) for j in range(12)])
    waves = A.to_fourier(pin[None] * np.exp(1j * rng.normal(0, 0.5, (len(pos), 32, 32))))
    sig = 1.5
    canv = []
    for s in (None, np.full(len(pos), sig)):
        st = A.Stitcher((11 * pa, 11 * pa), pa, probe_k)
        st.add(waves, pos * pa, s)
        canv.append(st.T)
    ref = gaussian_filter(canv[0].real, sig, mode="constant", truncate=8) + 1j * gaussian_filter(
        canv[0].imag, sig, mode="constant", truncate=8)
    assert np.abs(canv[1] - canv[0]).max() > 0.1 * np.abs(canv[0]).max()
    assert np.abs(canv[1] - ref).max() < 3e-3 * np.abs(canv[0]).max()
    np.testing.assert_allclose(A.smoothing_sigma(np.array([1.3, 2.3]), np.log(0.8), -0.5), [0.8, 0.8 * np.exp(-0.5)])


def test_dose_input_channel():
    """The v2 dose input: channel 12 = log10 of the kernel's mean counts per pattern (6 for noise-free data), the
    first 12 channels as without it; v1's 12-channel weights still load, and a 13-channel file round-trips."""
    probe_k = A.probe_frame(E_KEV, ALPHA)
    cbed = np.abs(probe_k) ** 2
    k = np.stack([cbed * 20.0 / cbed.sum() * f for f in (1, 1, 1, 1, 1, 1, 1, 1, 1.9)]).reshape(1, 3, 3, *cbed.shape)
    x12 = A.network_inputs(k, probe_k, 0.2)
    x13 = A.network_inputs(k, probe_k, 0.2, dose_input=True)
    assert x12.shape[1] == 12 and x13.shape[1] == 13
    np.testing.assert_array_equal(x13[:, :12], x12)
    np.testing.assert_allclose(x13[0, 12], np.log10(20.0 * 9.9 / 9), rtol=1e-6)  # mean of 8 × 20 and 38 counts
    assert np.all(A.network_inputs(k, probe_k, 0.2, True, noise_free=True)[0, 12] == A.DOSE_NOISE_FREE)
    assert np.all(A.network_inputs(k * 1e-3, probe_k, 0.2, True)[0, 12] == 0.0)  # < 1 count: clipped at 0
    assert A.is_counts(np.array([0.0, 3.0, 7.0])) and not A.is_counts(np.array([0.0, 3.5]))
    assert not A.has_dose_input("airpi_v1")
    params, widths = A.load_weights_file(A.weights_path("airpi_v1"))
    assert params["e0a/w"].shape[1] == 12 and widths == A.DEFAULT_WIDTHS


def test_untrained_dose_input_network_is_the_probe_only_baseline(tmp_path, monkeypatch):
    """A 13-channel (dose input) network with a zero residual, run by the reconstructor: the baseline again, on
    counts and on noise-free (non-integer) data; the reconstructor builds the 13th channel itself: log10 of the
    kernel's mean counts per pattern for counts, DOSE_NOISE_FREE for intensities."""
    pytest.importorskip("jax")
    w = tmp_path / "init13.npz"
    A.save_weights(w, A.init_params(0, dose_input=True), A.DEFAULT_WIDTHS)
    assert A.has_dose_input(str(w))
    seen = []
    real = A.predict_waves
    monkeypatch.setattr(A, "predict_waves", lambda inp, weights: seen.append(inp) or real(inp, weights))
    rng = np.random.default_rng(0)
    probe_k = A.probe_frame(E_KEV, ALPHA)
    # the data's pixel (2.5 mrad) and centre are the frame's (4α/N, N/2): the rebinning keeps every count
    grid = type("G", (), {"shape": (32, 32), "centre_px": (16.0, 16.0), "sampling_mrad": (2.5, 2.5)})()
    counts = rng.poisson(np.broadcast_to(np.abs(probe_k) ** 2 * 2.0, (5, 6, 32, 32))).astype(np.float32)
    for data, level in ((counts, np.log10(counts[:3, :3].sum(axis=(-2, -1)).mean())),
                        (counts * 0.37 + 0.01, A.DOSE_NOISE_FREE)):
        net = A.reconstruct_airpi(data, grid, 0.3, E_KEV, ALPHA, None, "network", str(w))
        base = A.reconstruct_airpi(data, grid, 0.3, E_KEV, ALPHA, None, "probe_only")
        assert base["phase"].std() > 1e-3
        np.testing.assert_allclose(net["phase"], base["phase"], atol=1e-4)
        x = seen.pop()
        assert x.shape[1] == 13
        np.testing.assert_allclose(x[0, 12], level, rtol=1e-5)  # the first interior position's kernel


@pytest.mark.slow
def test_tiny_training_run_is_deterministic(tmp_path):
    """Same seed → the same weights bit for bit (data, noise draws, initialisation and Adam steps)."""
    pytest.importorskip("optax")
    from tembench_friedrich2023 import airpi_train as T

    # 3 + 2 steps: both phases (the default fine-tuning is 600 steps, which made this test take minutes)
    metas = [T.train(tmp_path / d, steps=3, n_crystals=2, finetune_steps=2, log=lambda m: None) for d in ("a", "b")]
    a, b = (np.load(tmp_path / d / f"{T.VERSION}.npz") for d in ("a", "b"))
    assert sorted(a.files) == sorted(b.files)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)
    assert metas[0]["history"]["val_loss"] == metas[1]["history"]["val_loss"]
    assert np.isfinite(metas[0]["history"]["val_loss"][-1])


def _measurement(shape=(5, 5, 16, 16)):
    return Measurement("4dstem", np.ones(shape, np.float32), ("scan_y", "scan_x", "k_y", "k_x"),
                       Geometry(energy_keV=300.0, semiangle_mrad=20.0, scan_step_A=(0.2, 0.2),
                                detector_sampling_mrad=(5.0, 5.0)))


def test_bad_input_is_refused():
    rec = A.AIRPIReconstructor()
    with pytest.raises(TembenchError, match="3 x 3"):
        rec.reconstruct(_measurement((2, 5, 16, 16)), rec.Params(mode="probe_only"), np)
    with pytest.raises(TembenchError, match="no shipped weights"):
        rec.reconstruct(_measurement(), rec.Params(weights="nope"), np)
    with pytest.raises(TembenchError, match="semiangle"):
        A.frame_pixel_A(300.0, 0.0)
    oblong = _measurement()
    oblong = oblong.replace(geometry=oblong.geometry.replace(scan_step_A=(0.2, 0.3)))
    with pytest.raises(TembenchError, match="square step"):     # the 8 symmetries swap the scan axes
        rec.reconstruct(oblong, rec.Params(symmetrise=True), np)


def test_without_jax_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "jax" or name.startswith("jax."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jax", None)
    rec = A.AIRPIReconstructor()
    with pytest.raises(TembenchError, match=r'pip install -e "\.\[nn\]"'):
        rec.reconstruct(_measurement(), rec.Params(), np)
    # the baseline needs no network
    out = rec.reconstruct(_measurement(), rec.Params(mode="probe_only"), np)
    assert out.quantity == "phase_rad" and out.sampling_A[0] == pytest.approx(A.frame_pixel_A(300.0, 20.0))


def test_untrained_network_is_the_probe_only_baseline(tmp_path):
    """Zero residual (the initial output conv is zero): the network's skip connections alone = the baseline."""
    pytest.importorskip("jax")
    w = tmp_path / "init.npz"
    A.save_weights(w, A.init_params(0), A.DEFAULT_WIDTHS)
    rng = np.random.default_rng(0)
    probe_k = A.probe_frame(E_KEV, ALPHA)
    data = rng.poisson(np.broadcast_to(np.abs(probe_k) ** 2 * 2.0, (6, 5, 32, 32))).astype(np.float32)
    grid = type("G", (), {"shape": (32, 32), "centre_px": (16.0, 16.0), "sampling_mrad": (2.5, 2.5)})()
    net = A.reconstruct_airpi(data, grid, 0.3, E_KEV, ALPHA, None, "network", str(w))
    base = A.reconstruct_airpi(data, grid, 0.3, E_KEV, ALPHA, None, "probe_only")
    assert base["phase"].std() > 1e-3
    np.testing.assert_allclose(net["phase"], base["phase"], atol=1e-4)


@pytest.fixture(scope="module")
def heldout():
    pytest.importorskip("jax")
    from tembench_friedrich2023 import airpi_train as T

    return T.heldout_measurement()


def bar_failures(heldout, weights: str = A.DEFAULT_WEIGHTS) -> list[str]:
    """The v2 bar (session 7, kept): over five noise draws of the held-out set at 500 e/Å² (noise seeds 20261206 + i)
    AIRPI's mean NCC is ahead of the probe-only baseline *and* iCOM by more than twice the standard error of the
    paired difference; at 5 000 e/Å² (three draws) it is not behind either (1e5: the next test). Returns what fails."""
    from tembench_friedrich2023 import airpi_train as T

    out = []
    res = T.evaluate_draws(weights, dose=500.0, measurement=heldout, log=lambda m: None)
    for b in ("probe_only", "icom"):
        d = res[f"airpi_minus_{b}"]
        if not d["mean"] > 2 * d["se"]:
            out.append(f"500 e/A2 vs {b}: {d['mean']:+.4f} +- {d['se']:.4f} ({res['mean']})")
    res = T.evaluate_draws(weights, dose=5000.0, draws=3, measurement=heldout, log=lambda m: None)
    for b in ("probe_only", "icom"):
        if not res[f"airpi_minus_{b}"]["mean"] > 0:
            out.append(f"5000 e/A2 vs {b}: {res[f'airpi_minus_{b}']} ({res['mean']})")
    return out


@pytest.mark.slow
def test_beats_probe_only_and_icom_at_low_dose_heldout(heldout):
    """Done-when: on twisted bilayer MoS2 (a structure the network never saw; stem4d, 300 kV, 20 mrad, 0.2 Å
    step) at 500 e/Å² (20 e/pattern), AIRPI's phase correlates better with the true phase than the probe-only
    baseline and iCOM (cross_correlation NCC), by the five-draw bar of :func:`bar_failures`. The shipped airpi_v2
    (dose input, stitched-field NCC loss, learned dose-dependent smoothing; docs/airpi.md, session 9): 0.636 vs
    probe-only 0.517 (+0.120 ± 0.005) and iCOM 0.537 (+0.100 ± 0.013). airpi_v1 fails it (0.434; checked when this
    test was flipped from a strict xfail). Not tested here: the probe-only baseline *with* v2's kind of learnt
    smoothing reaches 0.632 at 500 e/Å² (docs/airpi.md, control S0), level with v2 there."""
    assert bar_failures(heldout) == []


@pytest.mark.slow
def test_heldout_high_dose_and_shipped_numbers(heldout):
    """At 1e5 e/Å² the shipped network is (narrowly) ahead of both baselines, and the sidecar's numbers are
    what this environment reproduces (same scenario and seed → the same NCC, up to the FFT plans of the machine)."""
    from tembench_friedrich2023 import airpi_train as T

    res = T.evaluate_heldout(doses=(1.0e5,), seed=T.SEED + 5 + 2, measurement=heldout, log=lambda m: None)[1.0e5]
    assert res["airpi"] > res["icom"] + 0.005, res
    assert res["airpi"] > res["probe_only"], res
    shipped = A.weights_metadata()["heldout"]["ncc"]["100000"]
    assert res["airpi"] == pytest.approx(shipped["airpi"], abs=2e-3)
    # not bit for bit across machines: the held-out data are simulated with pyFFTW plans from this machine's
    # wisdom (tembench.backend), and a plan measured on another machine rounds differently; Poisson counts
    # then flip here and there. Measured on a fresh machine of the same kind: iCOM 0.892315 vs 0.892389 shipped
    assert res["icom"] == pytest.approx(shipped["icom"], abs=1e-3)


def _periodic_scan_frames(obj, probe_r, step_px):
    """Centred diffraction frames (m, m, N, N) of a periodic scan: |F[P(x − r)·O(x)]|², r = step·(a, b) px."""
    n = obj.shape[0]
    m = n // step_px
    out = np.empty((m, m, n, n))
    for a in range(m):
        for b in range(m):
            psi = np.roll(probe_r, (a * step_px, b * step_px), axis=(0, 1)) * obj
            out[a, b] = np.abs(np.fft.fftshift(np.fft.fft2(psi, norm="ortho"))) ** 2
    return out


def test_symmetrised_inputs_are_the_scan_of_the_transformed_specimen():
    """transform_inputs maps the 3×3 kernel's scan offsets and every frame together: the network inputs of a scan of
    the transposed (or y-mirrored, or x-mirrored) specimen are, position by position, the transformed inputs of the
    original scan. A periodic 32-px object, probe from the frame's own aperture, step 4 px. Fails if the kernel
    axes or the frames are mapped alone, or a frame is flipped without the roll that keeps k = 0 at N//2."""
    n, step = A.N_FRAME, 4
    probe_k = A.probe_frame(E_KEV, ALPHA)
    probe_r = np.fft.ifft2(np.fft.ifftshift(probe_k), norm="ortho")
    probe_r = np.roll(probe_r, (-(n // 2), -(n // 2)), axis=(0, 1))            # centred on pixel 0
    rng = np.random.default_rng(4)
    obj = np.exp(1j * rng.normal(0.0, 0.6, (n, n)))
    m = n // step

    def inputs(o, rows, cols):
        f = _periodic_scan_frames(o, probe_r, step)
        return A.network_inputs(A.kernels_at(f, rows, cols), probe_k, step * 0.1, dose_input=True, noise_free=True)

    rr, cc = np.meshgrid(np.arange(2, m - 2), np.arange(2, m - 2), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    x0 = inputs(obj, rr, cc)
    neg = (-np.arange(n)) % n                                                    # pixel i ↦ −i (the scan origin)
    cases = {(True, False, False): (obj.T, cc, rr),
             (False, True, False): (obj[neg], (m - rr) % m, cc),
             (False, False, True): (obj[:, neg], rr, (m - cc) % m)}
    for sym, (o, r2, c2) in cases.items():
        np.testing.assert_allclose(A.transform_inputs(x0, sym), inputs(o, r2, c2), rtol=1e-5, atol=1e-6,
                                   err_msg=str(sym))
    # and the waves map back: ψ of the transformed specimen, untransformed, is the original's
    psi = np.fft.fftshift(np.fft.fft2(probe_r * obj, norm="ortho"))[None]
    for sym in A.SQUARE_SYMMETRIES:
        back = A.untransform_waves(A.transform_inputs(np.concatenate([np.abs(psi[:, None]).repeat(9, 1),
                                                                      np.zeros((1, 4, n, n))], 1), sym)[:, 4], sym)
        np.testing.assert_allclose(back, np.abs(psi), atol=1e-12)
