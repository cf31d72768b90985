"""End-to-end ptychographic tomography (You 2025 Alg. 3, eqs 14–19): the gradients of one tilt's loss w.r.t.
every parameter group by central differences, the probe's reference plane, and the recovery of a small atomic
volume from a tilt series simulated by the core ``stem4d`` (rotated atoms, 0.125 Å, 1 Å slices: no shared
operator with the reconstruction's voxel rotation and slabs).

The engine is float32/complex64; differences use steps between truncation and round-off and are compared
within 1 % (measured errors printed by ``-s``: ≲ 0.3 %). Every test draws from its own seeded generator.
"""

from __future__ import annotations

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import stem as S
from tembench.types import Geometry, Sample
from tembench_you2025 import e2e as E
from tembench_you2025.tomo_common import nominal_euler_deg, rotation_centre_zyx_A, slabs, tomo_grid

E_KEV = 200.0
S_A = 0.25
B = 4


def _smooth(shape, width_px, rng):
    f = np.ones(shape)
    for ax, n in enumerate(shape):
        k = np.fft.fftfreq(n)
        sh = [1] * len(shape)
        sh[ax] = n
        f = f * np.exp(-(k.reshape(sh) * 2 * np.pi * width_px) ** 2 / 2)
    return np.fft.ifftn(np.fft.fftn(rng.standard_normal(shape)) * f).real


@pytest.fixture(scope="module")
def tilt_problem():
    """A smooth complex volume (≤ 30 V, absorption ≤ 1.5 V) turned by a general Euler rotation, 4 probe
    positions away from half-pixel boundaries (where the whole-pixel window origin jumps), 2 probe modes,
    patterns from a different volume at shifted positions."""
    rng = np.random.default_rng(5)
    grid = tomo_grid((24, 24), S_A, (3.5, 3.0, 3.0), nz=14)  # 14 = 3·4 + 2: the last slab is thinner
    re = _smooth(grid.shape, 1.5, rng)
    im = np.abs(_smooth(grid.shape, 1.5, rng))
    v = (30 * re / np.abs(re).max() + 1.5j * im / im.max()).astype(np.complex64)
    probe = S.make_probe_modes((16, 16), S_A, E_KEV, 25.0, {"C10": -10.0}, n_modes=2, defocus_spread_A=20.0)
    euler, tau = (7.0, 25.0, -4.0), (0.31, -0.22)
    local = np.array([[2.02, 2.13], [2.53, 2.88], [3.07, 1.73], [3.62, 3.24]])
    pos = local + np.asarray(grid.origin_yx_A) + np.asarray(tau)  # sample frame
    truth = (1.1 * v + 0.05 * v.conj()).astype(np.complex64)
    meas = S.stem_scan(slabs(truth, euler, B, S_A), E._slab_thicknesses(grid, B), energy_keV=E_KEV,
                       sampling_A=(S_A, S_A), positions_A=local + 0.05, probe=probe, band_limit=None,
                       bandlimit_transmission=False).patterns
    kw = dict(energy_keV=E_KEV, amplitude_eps=1e-5)
    return dict(v=v, meas=meas, pos=pos, euler=euler, tau=np.asarray(tau), probe=probe, grid=grid, kw=kw)


def _loss(pb, **over):
    a = {**pb, **over}
    return E.tilt_loss_and_gradient(a["v"], a["meas"], a["pos"], a["euler"], a["tau"], a["probe"], a["grid"], B,
                                    **a["kw"]).loss


def _grad(pb):
    return E.tilt_loss_and_gradient(pb["v"], pb["meas"], pb["pos"], pb["euler"], pb["tau"], pb["probe"], pb["grid"],
                                    B, return_position_gradient=True, **pb["kw"])


def _check(fd, an, what, rel=1e-2):
    print(f"{what}: fd {fd:.6e} analytic {an:.6e} rel {abs(fd - an) / abs(an):.2e}")
    assert fd == pytest.approx(an, rel=rel)


def test_tilt_model_is_the_engine_on_the_turned_slabs(tilt_problem):
    """Eq 14: the loss is the engine's on s·B_b A_Θ V at positions ρ − τ − origin (a wrong sign of τ, or of
    the origin, changes the loss)."""
    pb = tilt_problem
    w = slabs(pb["v"], pb["euler"], B, S_A)
    local = pb["pos"] - pb["tau"] - np.asarray(pb["grid"].origin_yx_A)
    direct = S.stem_loss_and_gradient(w, pb["meas"], E._slab_thicknesses(pb["grid"], B), energy_keV=E_KEV,
                                      sampling_A=(S_A, S_A), positions_A=local, probe=pb["probe"], band_limit=None,
                                      complex_potential=True, amplitude_eps=1e-5)[0]
    assert _loss(pb) == pytest.approx(direct, rel=1e-6)
    assert abs(_loss(pb, tau=-pb["tau"]) - direct) > 0.05 * direct


def test_volume_gradient_real_and_imaginary_parts(tilt_problem):
    """∂L/∂V through the slabs' exact adjoint, along smooth random directions of Re V and Im V and along the
    gradient itself; h = 1 V (σ·s·b·h ≈ 7e-4 rad per slab)."""
    pb = tilt_problem
    g = _grad(pb).volume
    assert g.shape == pb["v"].shape and np.iscomplexobj(g)
    rng = np.random.default_rng(21)
    h = 1.0
    for what, d in (("Re V", _smooth(pb["v"].shape, 1.5, rng)), ("Im V", 1j * _smooth(pb["v"].shape, 1.5, rng)),
                    ("along g", g / np.abs(g).max())):
        d = (d / np.abs(d).max()).astype(np.complex64)
        fd = (_loss(pb, v=pb["v"] + h * d) - _loss(pb, v=pb["v"] - h * d)) / (2 * h)
        _check(fd, float(np.real(np.vdot(g, d))), what)


def test_probe_mode_gradient(tilt_problem):
    pb = tilt_problem
    g = _grad(pb).probe
    rng = np.random.default_rng(22)
    p = pb["probe"]
    d = ((rng.standard_normal(p.shape) + 1j * rng.standard_normal(p.shape)) * np.abs(p)).astype(np.complex64)
    h = 3e-4  # the loss is quartic in ψ: 1e-3 leaves 1 % truncation error, 3e-5 float32 round-off
    fd = (_loss(pb, probe=p + h * d) - _loss(pb, probe=p - h * d)) / (2 * h)
    _check(fd, float(np.real(np.vdot(g, d))), "probe modes")


def test_position_and_translation_gradients(tilt_problem):
    """∂L/∂ρ per position, and ∂L/∂τ = −Σ_j ∂L/∂ρ_j (an object shift by +τ is a probe shift by −τ)."""
    pb = tilt_problem
    gr = _grad(pb)
    rng = np.random.default_rng(23)
    h = 1e-3
    d = rng.standard_normal(pb["pos"].shape)
    fd = (_loss(pb, pos=pb["pos"] + h * d) - _loss(pb, pos=pb["pos"] - h * d)) / (2 * h)
    _check(fd, float((gr.positions * d).sum()), "positions")
    np.testing.assert_allclose(gr.translation, -gr.positions.sum(axis=0))
    for a in range(2):
        e = np.zeros(2)
        e[a] = h
        fd = (_loss(pb, tau=pb["tau"] + e) - _loss(pb, tau=pb["tau"] - e)) / (2 * h)
        _check(fd, float(gr.translation[a]), f"translation {'yx'[a]}")


def test_euler_angles_are_held_fixed(tilt_problem):
    """The paper's Alg. 3 keeps Θ from joint_linear_tomo: the result carries the given angles unchanged."""
    pb = tilt_problem
    pats = [pb["meas"]]
    r = E.reconstruct_e2e(pats, [pb["pos"]], Geometry(energy_keV=E_KEV), pb["grid"], [pb["euler"]], [pb["tau"]],
                          pb["probe"], E.E2EParams(n_epochs=1, batch_size=2))
    np.testing.assert_array_equal(r.euler_deg, [pb["euler"]])
    np.testing.assert_array_equal(r.translations_A, [pb["tau"]])


def test_volume_update_modes(tilt_problem):
    """One batch per tilt: 'tilt' and 'minibatch' updates are the same step; with several batches they differ
    only by the rotation's interpolation blur between the slabs and the volume. Each lowers the loss."""
    pb = tilt_problem
    geo = Geometry(energy_keV=E_KEV)
    args = ([pb["meas"]], [pb["pos"]], geo, pb["grid"], [pb["euler"]], [pb["tau"]], pb["probe"])
    one = dict(n_epochs=1, batch_size=4, start_probe_epoch=None)
    a = E.reconstruct_e2e(*args, E.E2EParams(volume_update="tilt", **one)).volume
    b = E.reconstruct_e2e(*args, E.E2EParams(volume_update="minibatch", **one)).volume
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max())
    two = dict(n_epochs=3, batch_size=2, start_probe_epoch=None)
    ra = E.reconstruct_e2e(*args, E.E2EParams(volume_update="tilt", **two))
    rb = E.reconstruct_e2e(*args, E.E2EParams(volume_update="minibatch", **two))
    corr = np.abs(np.vdot(ra.volume, rb.volume)) / np.linalg.norm(ra.volume) / np.linalg.norm(rb.volume)
    print("tilt vs minibatch: correlation", corr, ra.history["loss"], rb.history["loss"])
    assert corr > 0.98
    for r in (ra, rb):
        assert np.all(np.diff(r.history["loss"]) < 0)


def test_position_refinement_recovers_offsets(tilt_problem):
    """With the volume held (step 1e-9) at the one that made the patterns, Newton steps on the positions bring
    start positions 0.05 Å + up to ±0.12 Å off back to the truth; the input positions are not modified."""
    pb = tilt_problem
    truth_v = (1.1 * pb["v"] + 0.05 * pb["v"].conj()).astype(np.complex64)
    true_pos = pb["pos"] + 0.05
    start = pb["pos"] + np.random.default_rng(26).uniform(-0.12, 0.12, pb["pos"].shape)
    given = start.copy()
    r = E.reconstruct_e2e([pb["meas"]], [start], Geometry(energy_keV=E_KEV), pb["grid"], [pb["euler"]], [pb["tau"]],
                          pb["probe"], E.E2EParams(n_epochs=6, batch_size=4, step_size=1e-9, start_probe_epoch=None,
                                                   start_position_epoch=0, position_frame="none"),
                          init_volume=truth_v)
    err0 = np.abs(start - true_pos).max()
    err = np.abs(r.positions_A[0] - true_pos).max()
    print(f"position error {err0:.3f} -> {err:.4f} Å; updates {np.round(r.history['position_update_rms_A'], 4)}")
    assert err < 0.15 * err0  # measured 0.154 -> 0.014 Å
    np.testing.assert_array_equal(start, given)


def test_l1_shrinkage_of_the_absorption(tilt_problem):
    """Eq 17 after each update: ‖Im V‖₁ falls and voxels become exactly zero; Re V is left alone."""
    pb = tilt_problem
    args = ([pb["meas"]], [pb["pos"]], Geometry(energy_keV=E_KEV), pb["grid"], [pb["euler"]], [pb["tau"]],
            pb["probe"])
    for mode in ("tilt", "minibatch"):
        kw = dict(n_epochs=2, batch_size=2, start_probe_epoch=None, volume_update=mode)
        free = E.reconstruct_e2e(*args, E.E2EParams(**kw)).volume
        shrunk = E.reconstruct_e2e(*args, E.E2EParams(l1_imag=1e-9, **kw)).volume
        l1f, l1s = float(np.abs(free.imag).sum()), float(np.abs(shrunk.imag).sum())
        print(mode, "‖Im V‖₁", l1f, l1s, "zeros", np.mean(free.imag == 0), np.mean(shrunk.imag == 0))
        assert 0 < l1s < 0.5 * l1f
        assert np.mean(shrunk.imag == 0) > np.mean(free.imag == 0) + 0.1
    real = E.reconstruct_e2e(*args, E.E2EParams(n_epochs=1, reconstruct_absorption=False)).volume
    assert np.all(real.imag == 0) and np.any(real.real != 0)


def test_probe_propagation_sign_matches_the_engine():
    """A probe propagated by +D and then through an object slice gives the patterns of the engine's stack of D
    of vacuum followed by that slice: forward = positive distance (−D gives different patterns)."""
    rng = np.random.default_rng(24)
    obj = (400 * np.abs(_smooth((1, 32, 32), 1.0, rng))).astype(np.float32)
    probe = S.make_probe_modes((32, 32), S_A, E_KEV, 25.0, {"C10": -30.0})
    pos = np.array([[4.1, 3.9], [3.3, 4.6]])
    d_a = 24.0
    stack = np.concatenate([np.zeros((3, 32, 32), np.float32), obj])
    ref = S.stem_scan(stack, [d_a / 3] * 3 + [1.0], energy_keV=E_KEV, sampling_A=S_A, positions_A=pos,
                      probe=probe, band_limit=None).patterns
    kw = dict(energy_keV=E_KEV, sampling_A=S_A, positions_A=pos, band_limit=None)
    fwd = S.stem_scan(obj, 1.0, probe=E.propagate_probe(probe, d_a, S_A, E_KEV), **kw).patterns
    bwd = S.stem_scan(obj, 1.0, probe=E.propagate_probe(probe, -d_a, S_A, E_KEV), **kw).patterns
    err = np.abs(fwd - ref).max() / ref.max()
    assert err < 1e-4
    assert np.abs(bwd - ref).max() / ref.max() > 100 * err


def test_probe_refers_to_the_volume_entrance():
    g = tomo_grid((16, 16), S_A, (5.0, 2.0, 2.0), nz=16)  # entrance at z = 5 − 2 = 3 Å
    probe = S.make_probe_modes((16, 16), S_A, E_KEV, 25.0, {"C10": -10.0})
    geo = Geometry(energy_keV=E_KEV, extra={"entrance_z_A": 1.0})
    moved = E.probe_at_volume_entrance(probe, geo, g, S_A)
    np.testing.assert_allclose(moved, E.propagate_probe(probe, 2.0, S_A, E_KEV), atol=1e-7)
    same = E.probe_at_volume_entrance(probe, Geometry(energy_keV=E_KEV), g, S_A)
    np.testing.assert_array_equal(same, probe)


def test_bad_inputs(tilt_problem):
    pb = tilt_problem
    geo = Geometry(energy_keV=E_KEV)
    with pytest.raises(TembenchError, match="probe window"):
        E.reconstruct_e2e([pb["meas"][:, :8, :8]], [pb["pos"]], geo, pb["grid"], [pb["euler"]], [pb["tau"]],
                          pb["probe"], E.E2EParams(n_epochs=1))
    with pytest.raises(TembenchError, match="probes"):
        E.reconstruct_e2e([pb["meas"]], [pb["pos"]], geo, pb["grid"], [pb["euler"]], [pb["tau"]],
                          np.stack([pb["probe"]] * 2), E.E2EParams(n_epochs=1))
    with pytest.raises(TembenchError, match="voxel"):
        E.reconstruct_e2e([pb["meas"]], [pb["pos"]], Geometry(energy_keV=E_KEV, detector_sampling_mrad=3.0),
                          pb["grid"], [pb["euler"]], [pb["tau"]], pb["probe"], E.E2EParams(n_epochs=1))
    with pytest.raises(Exception, match="extra"):
        E.E2EParams(not_a_param=1)


# --- recovery of a small atomic volume ----------------------------------------------------------------------
ANGLES_DEG = [-60.0, -50.0, -40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]


def _cluster(cell=8.0):
    """Six atoms (Cu, Si, O pairs) within 2.2 Å of the centre of an 8 Å cube, at least 1.6 Å apart."""
    rng = np.random.default_rng(2)
    pts = []
    while len(pts) < 6:
        q = rng.uniform(-2.0, 2.0, 3)
        if np.linalg.norm(q) < 2.2 and all(np.linalg.norm(q - r) > 1.6 for r in pts):
            pts.append(q)
    return Sample(positions_A=np.array(pts) + cell / 2, numbers=[29, 29, 14, 14, 8, 8], cell_A=[cell] * 3)


@pytest.fixture(scope="module")
def tilt_series():
    """stem4d: 13 tilts ±60°, 16 × 16 probes 0.5 Å apart, 200 keV, 25 mrad, Δf = 20 Å, simulated on 0.125 Å
    with 1 Å slices, the central 32² of 64² detector pixels kept → 0.25 Å reconstruction voxels, 32³ grid."""
    from tembench.builtin.forward_multislice import STEM4D

    smp = _cluster()
    p = STEM4D.Params(sampling_A=0.125, energy_keV=E_KEV, semiangle_mrad=25.0, defocus_A=20.0, scan_step_A=0.5,
                      window_gpts=64, detector_gpts=32, slice_thickness_A=1.0, tilt_angles_deg=ANGLES_DEG,
                      detectors={})
    return smp, STEM4D().simulate(smp, p, np)


@pytest.mark.slow
def test_noise_free_e2e_recovers_a_small_volume(tilt_series):
    """Noise-free, true alignment and probe, V⁰ = 0: FSC vs the sample's potential (same voxels) stays above
    0.5 up to Nyquist (2 voxels = 0.5 Å) after 10 epochs (measured: FSC ≥ 0.52 in every shell, 0.143
    never crossed; the loss falls 30×)."""
    from tembench.analysis.fsc import fourier_shell_correlation

    smp, m = tilt_series
    g = m.geometry
    n = len(ANGLES_DEG)
    grid = tomo_grid((32, 32), S_A, rotation_centre_zyx_A(g))
    assert grid.origin_A == (0.0, 0.0, 0.0)
    probe = S.make_probe_modes((32, 32), S_A, E_KEV, 25.0, {"C10": -20.0})
    pats = m.data.reshape(n, -1, 32, 32)
    pos = [g.scan_positions_A] * n
    r = E.reconstruct_e2e(pats, pos, g, grid, nominal_euler_deg(g), np.zeros((n, 2)), probe,
                          E.E2EParams(n_epochs=10, step_size=1.0, start_probe_epoch=None))
    truth = smp.potential_volume(S_A)
    c = fourier_shell_correlation(r.volume.real, truth, (S_A,) * 3)
    print("FSC vs truth", np.round(c.fsc, 2), "loss", np.round(r.history["loss_relative"], 7))
    res = c.resolution(0.5)
    assert not res.reached and res.resolution_A == pytest.approx(2 * S_A)
    assert r.history["loss"][-1] < 0.1 * r.history["loss"][0]
    # the depth sections are atoms, not streaks: the strongest voxel sits within a voxel of a Cu atom
    iz, iy, ix = np.unravel_index(np.argmax(r.volume.real), grid.shape)
    cu = smp.positions_A[smp.numbers == 29]
    assert np.min(np.linalg.norm(cu - np.array([ix, iy, iz]) * S_A, axis=1)) < 1.5 * S_A


# --- the pipeline: msp → joint_linear_tomo → e2e ---------------------------------------------------------------
@pytest.fixture(scope="module")
def unaligned_series():
    """stem4d_tilt_series of the cluster in a 12 Å cube (vacuum around it): 5 tilts ±40°, translations up to 1 Å,
    a 12 × 12 scan over the central 6 Å."""
    from tembench_you2025.tilt_series import STEM4DTiltSeries

    smp = _cluster(12.0)
    p = STEM4DTiltSeries.Params(sampling_A=0.125, energy_keV=E_KEV, semiangle_mrad=25.0, defocus_A=20.0,
                                scan_step_A=0.5, scan_start_A=(3.0, 3.0), scan_end_A=(9.0, 9.0), window_gpts=64,
                                detector_gpts=32, slice_thickness_A=1.0, tilt_angles_deg=[-40, -20, 0, 20, 40],
                                detectors={}, max_translation_A=1.0, alignment_seed=1)
    return smp, STEM4DTiltSeries().simulate(smp, p, np)


PIPELINE = dict(linear={"msp": {"n_iterations": 4, "n_slices": 3}, "n_outer": 3, "n_final_steps": 30},
                e2e={"n_epochs": 3, "step_size": 1.0})


def _shift_free_correlation(a, gt):
    """max over global shifts of the normalised cross-correlation (a common volume shift is not measurable)."""
    xc = np.fft.ifftn(np.fft.fftn(a) * np.conj(np.fft.fftn(gt))).real
    return float(xc.max() / np.sqrt((a**2).sum() * (gt**2).sum()))


@pytest.mark.slow
def test_pipeline_runs_msp_linear_then_e2e(unaligned_series):
    """The three steps: the alignment is joint_linear_tomo's (held fixed), the probes are msp's propagated from the
    simulated stack's entrance to the volume's, V⁰ = 0, and Alg. 3 lowers the loss; the e2e volume correlates with
    the true potential (after the unmeasurable global shift) far above a volume of the same power spectrum with
    scrambled phases. As a reconstructor it honours a pattern mask."""
    import dataclasses

    from tembench.builtin.quantifiers_fsc import truth_on_reconstruction_grid

    smp, m = unaligned_series
    p = E.E2EPtychoTomoParams(**PIPELINE)
    res, lin, grid, timings = E.e2e_stage(m, p, np)
    n = m.data.shape[0]
    np.testing.assert_array_equal(res.translations_A, lin.translations_A)
    np.testing.assert_array_equal(res.euler_deg, lin.euler_deg)
    assert res.volume.shape == grid.shape and res.probes.shape[:2] == (n, 1)
    loss = res.history["loss"]
    assert loss[-1] < 0.5 * loss[0]
    from tembench import Reconstruction

    s = grid.voxel_A
    vol = Reconstruction(kind="volume", data=res.volume.real.astype(np.float32), sampling_A=(s, s, s),
                         quantity="potential_V", origin_A=grid.origin_A)
    a, gt = truth_on_reconstruction_grid(vol, smp, E_KEV)
    rng = np.random.default_rng(25)
    scrambled = np.fft.irfftn(np.abs(np.fft.rfftn(a)) * np.exp(2j * np.pi * rng.random(np.fft.rfftn(a).shape)),
                              a.shape, axes=(0, 1, 2))
    c, c0 = _shift_free_correlation(a, gt), _shift_free_correlation(scrambled, gt)
    la, lgt = truth_on_reconstruction_grid(dataclasses.replace(vol, data=lin.volume_V), smp, E_KEV)
    print(f"vs truth (best global shift): e2e {c:.3f}, scrambled {c0:.3f}, linear {_shift_free_correlation(la, lgt):.3f};"
          f" loss {np.round(loss, 3)}; {timings}")
    assert c > max(0.15, 3 * c0)
    # the reconstructor, with half the patterns masked out
    mask = np.zeros(m.data.shape[1:3], bool)
    mask[:, ::2] = True
    rec = E.E2EPtychoTomo().reconstruct(m.replace(extras={**m.extras, "pattern_mask": mask}), p, np)
    assert rec.kind == "volume" and rec.quantity == "potential_V" and rec.data.dtype == np.float32
    assert rec.origin_A == grid.origin_A and rec.data.shape == grid.shape
    for key in ("euler_deg", "translations_A", "absorption_V", "probe_modes", "linear_volume_V"):
        assert key in rec.extras
    assert np.all(np.isfinite(rec.data)) and rec.history["loss"][-1] < rec.history["loss"][0]


def test_pipeline_params_and_registration():
    from tembench import hookimpl
    from tembench.registry import Registry

    with pytest.raises(Exception, match="not_a_param"):
        E.E2EPtychoTomoParams(linear={"not_a_param": 1})
    with pytest.raises(Exception, match="n_epochs"):
        E.E2EPtychoTomoParams(e2e={"n_epochs": 0})
    assert E.E2EPtychoTomoParams(linear={"msp": {"n_iterations": 3}}).linear["msp"]["n_iterations"] == 3

    class Plugin:
        @hookimpl
        def tembench_register_reconstructors(self):
            return [E.E2EPtychoTomo]

    reg = Registry(load_entry_points=False)
    reg.register(Plugin(), name="e2e_test_plugin")
    cls = reg.get("reconstructor", "e2e_ptycho_tomo")
    assert cls is E.E2EPtychoTomo and cls.supports_pattern_mask and cls.accepts == ("4dstem_tilt_series",)
