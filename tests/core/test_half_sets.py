"""Half-set split (``half_sets`` noise step) and the runner's reconstruction of each half."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dummy_plugin
from tembench import ForwardModel, Geometry, Measurement, Params, Quantifier, Reconstruction, Reconstructor, hookimpl
from tembench.builtin.half_sets import HalfSets, binomial_half
from tembench.cache import StageCache
from tembench.eer import ElectronEvents
from tembench.errors import TembenchError
from tembench.runner import run_scenario
from tembench.scenario import parse_scenario
from tembench.types import HALF_SETS, half_measurement, require_full_scan

DOSE = 30.0  # e/Å² on 1 Å² pixels: ~30-60 counts per pixel of the dummy image (1 + Gaussian blob)


class HalvesProbe(Quantifier):
    """Returns the full and the two half reconstructions as artifacts."""

    name = "halves_probe"
    accepts = ("image",)

    class Params(Params):
        pass

    def score(self, reconstruction, measurement, sample, params):
        a, b = reconstruction.extras[HALF_SETS]
        return {"full": reconstruction.data, "half_a": a.data, "half_b": b.data,
                "has_halves_in_measurement": HALF_SETS in measurement.extras}


class Toy4D(ForwardModel):
    """A constant 4D-STEM-like measurement (scan 5 × 4, detector 3 × 3)."""

    name = "toy_4d"
    produces = "4dstem"

    class Params(Params):
        pass

    def simulate(self, sample, params, xp):
        data = np.full((5, 4, 3, 3), 1 / 9, dtype=np.float32)
        return Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"),
                           geometry=Geometry(scan_step_A=(1.0, 1.0), sampling_A=(0.5, 0.5)))


class MaskedSum(Reconstructor):
    """Total counts per probe position; absent positions (pattern_mask False) are NaN."""

    name = "toy_masked_sum"
    accepts = ("4dstem",)
    supports_pattern_mask = True

    class Params(Params):
        pass

    def reconstruct(self, measurement, params, xp):
        img = np.asarray(measurement.data, dtype=np.float64).sum(axis=(-2, -1))
        mask = measurement.extras.get("pattern_mask")
        if mask is not None:
            img = np.where(mask, img, np.nan)
        return Reconstruction(kind="image", data=img, sampling_A=1.0, quantity="counts")


class GridOnly(MaskedSum):
    name = "toy_grid_only"
    supports_pattern_mask = False


class _Plugin:
    @hookimpl
    def tembench_register_quantifiers(self):
        return [HalvesProbe]

    @hookimpl
    def tembench_register_forward_models(self):
        return [Toy4D]

    @hookimpl
    def tembench_register_reconstructors(self):
        return [MaskedSum, GridOnly]


@pytest.fixture
def reg(registry):
    registry.register(_Plugin(), name="half_sets_test_plugin")
    return registry


SCENARIO = f"""
name: halves
seed: 11
repeats: 2
sample: dummy_dot
forward: {{name: dummy_image, params: {{n: 64, width_px: 12}}}}
noise:
  - {{name: poisson_dose, params: {{dose_e_per_A2: {DOSE}}}}}
  - half_sets
reconstructors: [dummy_identity]
quantifiers: [halves_probe, dummy_mean]
"""


def _expected_counts(n: int = 64, width: float = 12.0) -> np.ndarray:
    y, x = np.mgrid[:n, :n] - n / 2
    return DOSE * (1.0 + np.exp(-(x**2 + y**2) / (2 * width**2)))


def _arrays(run_dir, table) -> list[dict[str, np.ndarray]]:
    out = []
    for rel in table.sort_values("repeat")["artifacts"]:
        with np.load(run_dir / rel) as z:
            out.append({k: z[k] for k in z.files})
    return out


def test_runner_reconstructs_independent_half_dose_halves(reg, tmp_path):
    sc = parse_scenario(SCENARIO)
    res = run_scenario(sc, out=tmp_path / "a", progress=False, report=False)
    t = res.table
    assert (t["status"] == "ok").all(), t.get("error")
    assert {"time_reconstruct_halves_s", "peak_memory_reconstruct_halves_MB"} <= set(t.columns)
    assert not t["recon_cache_hit"].any()
    assert dummy_plugin.CALLS["reconstruct"] == 2 * 3  # per repeat: full + A + B
    lam = _expected_counts()
    for arr in _arrays(res.run_dir, t):
        full, a, b = (arr[k].astype(np.float64) for k in ("halves_probe.full", "halves_probe.half_a",
                                                          "halves_probe.half_b"))
        assert np.array_equal(a + b, full)  # exactly: B = n − A
        assert np.all(a >= 0) and np.all(b >= 0) and np.all(a == np.rint(a))
        assert abs(a.sum() / full.sum() - 0.5) < 0.01 and abs(b.sum() / full.sum() - 0.5) < 0.01
        # independent Poisson halves of mean λ/2: uncorrelated noise, variance λ/2
        na, nb = a - lam / 2, b - lam / 2
        assert abs(np.corrcoef(na.ravel(), nb.ravel())[0, 1]) < 0.05
        assert abs(np.mean(na**2 / (lam / 2)) - 1) < 0.1
    # the reconstructors get the full data without the split payload; quantifiers see the measurement's
    assert t["has_halves_in_measurement"].all()

    # same seed → same bits (fresh folder, no cache)
    again = run_scenario(sc, out=tmp_path / "b", progress=False, report=False, use_cache=False)
    for x, y in zip(_arrays(res.run_dir, t), _arrays(again.run_dir, again.table)):
        assert x.keys() == y.keys() and all(x[k].tobytes() == y[k].tobytes() for k in x)

    # resume: lose a row; the re-run reuses the cached full and half reconstructions
    rows = sorted((res.run_dir / "rows").glob("*.json"))
    rows[0].unlink()
    calls = dummy_plugin.CALLS["reconstruct"]
    resumed = run_scenario(sc, out=tmp_path / "a", progress=False, report=False)
    assert dummy_plugin.CALLS["reconstruct"] == calls
    assert resumed.table["recon_cache_hit"].sum() == 1  # the full reconstruction and both halves
    for x, y in zip(_arrays(res.run_dir, t), _arrays(resumed.run_dir, resumed.table)):
        assert all(x[k].tobytes() == y[k].tobytes() for k in x)


def test_half_measurement_geometry_and_refusals():
    counts = np.random.default_rng(0).poisson(20.0, (8, 8)).astype(np.float32)
    geo = Geometry(sampling_A=(1.0, 1.0), dose_e_per_A2=20.0,
                   extra={"electrons_per_unit_intensity": 20.0, "dose_total_e_per_A2": 40.0})
    m = Measurement(kind="hrtem_image", data=counts, axes=("y", "x"), geometry=geo, counted=True)
    split = HalfSets().apply(m, HalfSets.Params(), np.random.default_rng(1))
    assert split.extras[HALF_SETS]["data_a"].dtype == np.uint8 and split.data is m.data
    a, b = half_measurement(split, 0), half_measurement(split, 1)
    for h in (a, b):
        assert h.geometry.dose_e_per_A2 == 10.0
        assert h.geometry.extra["electrons_per_unit_intensity"] == 10.0
        assert h.geometry.extra["dose_total_e_per_A2"] == 20.0
        assert HALF_SETS not in h.extras and h.data.dtype == np.float32
    assert np.array_equal(a.data + b.data, counts)
    assert (a.extras["half_index"], b.extras["half_index"]) == (0, 1)
    # not counted, non-integer counts, an image split by positions, a second split
    with pytest.raises(TembenchError, match="not counted.*poisson_dose"):
        HalfSets().apply(m.replace(counted=False), HalfSets.Params(), np.random.default_rng(1))
    # the noise-free point of a dose sweep (poisson_dose at .inf): both halves are the noise-free data
    inf_geo = geo.replace(dose_e_per_A2=float("inf"), extra={"electrons_per_unit_intensity": float("inf")})
    clean = HalfSets().apply(m.replace(counted=False, geometry=inf_geo), HalfSets.Params(), np.random.default_rng(1))
    assert all(half_measurement(clean, i).data is counts for i in (0, 1))
    with pytest.raises(TembenchError, match="not whole electron counts"):
        HalfSets().apply(m.replace(data=counts + 0.5), HalfSets.Params(), np.random.default_rng(1))
    with pytest.raises(TembenchError, match="no scan_y, scan_x.*split: dose"):
        HalfSets().apply(m, HalfSets.Params(split="positions"), np.random.default_rng(1))
    with pytest.raises(TembenchError, match="already split"):
        HalfSets().apply(split, HalfSets.Params(), np.random.default_rng(1))
    with pytest.raises(TembenchError, match="no half sets"):
        half_measurement(m, 0)


def test_binomial_half_is_chunk_independent_in_distribution_and_deterministic():
    n = np.random.default_rng(2).poisson(300.0, 10_000).astype(np.float32)
    a1 = binomial_half(n, np.random.default_rng(5), chunk_elems=1000)
    a2 = binomial_half(n, np.random.default_rng(5), chunk_elems=1000)
    assert a1.dtype == np.uint16 and np.array_equal(a1, a2)
    assert np.all(a1 <= n)
    assert abs(a1.mean() - n.mean() / 2) < 0.5


def test_positions_split_checkerboard_and_mask():
    data = np.random.default_rng(3).poisson(5.0, (5, 4, 3, 3)).astype(np.float32)
    m = Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"),
                    geometry=Geometry(scan_step_A=(1.0, 1.0), dose_e_per_A2=45.0, electrons_per_pattern=45.0,
                                      extra={"dose_total_e_per_A2": 45.0}), counted=True)
    split = HalfSets().apply(m, HalfSets.Params(split="positions"), np.random.default_rng(0))
    a, b = half_measurement(split, 0), half_measurement(split, 1)
    ma, mb = a.extras["pattern_mask"], b.extras["pattern_mask"]
    assert ma.shape == (5, 4) and np.array_equal(ma, ~mb) and ma.sum() == mb.sum() == 10
    assert not (ma[:-1, :] & ma[1:, :]).any() and not (ma[:, :-1] & ma[:, 1:]).any()  # checkerboard
    assert a.data is data and b.data is data  # shared, not copied
    assert a.geometry.electrons_per_pattern == 45.0 and a.geometry.extra["dose_total_e_per_A2"] == 22.5
    with pytest.raises(TembenchError, match="needs every probe position.*10 of 20"):
        require_full_scan(a, "ssb")
    require_full_scan(m, "ssb")  # the full scan passes


def test_eer_dose_split():
    counts = np.random.default_rng(4).poisson(2.0, (3, 3, 4, 4)).astype(np.float32)
    ev = ElectronEvents.from_dense(counts)
    m = Measurement(kind="eer", data=None, axes=("scan_y", "scan_x", "k_y", "k_x"), counted=True,
                    geometry=Geometry(electrons_per_pattern=32.0), extras={"events": ev})
    split = HalfSets().apply(m, HalfSets.Params(), np.random.default_rng(9))
    a, b = (half_measurement(split, i).extras["events"] for i in (0, 1))
    assert a.n_events + b.n_events == ev.n_events and 0 < a.n_events < ev.n_events
    assert np.array_equal(a.to_dense() + b.to_dense(), counts)
    assert half_measurement(split, 1).geometry.electrons_per_pattern == 16.0


def test_cache_round_trips_big_split_measurement(tmp_path, monkeypatch):
    """A big 4D measurement with its half set survives the stage cache (memory-mapped on a hit)."""
    monkeypatch.setattr("tembench.cache.MMAP_THRESHOLD_BYTES", 2**20)  # 1 MiB stands for GBs
    rng = np.random.default_rng(6)
    data = rng.poisson(3.0, (16, 16, 32, 32)).astype(np.float32)
    m = Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"), counted=True,
                    geometry=Geometry(scan_step_A=(1.0, 1.0), electrons_per_pattern=12000.0))
    split = HalfSets().apply(m, HalfSets.Params(), rng)
    pos = HalfSets().apply(m, HalfSets.Params(split="positions"), rng)
    cache = StageCache(tmp_path)
    assert cache.put("noise", "k1", {"value": split}) and cache.put("noise", "k2", {"value": pos})
    got = cache.get("noise", "k1")["value"]
    assert isinstance(got.data, np.memmap)
    assert np.array_equal(got.extras[HALF_SETS]["data_a"], split.extras[HALF_SETS]["data_a"])
    b = half_measurement(got, 1)
    assert np.array_equal(b.data, data - split.extras[HALF_SETS]["data_a"])
    got_pos = cache.get("noise", "k2")["value"]
    assert np.array_equal(got_pos.extras[HALF_SETS]["mask_a"], pos.extras[HALF_SETS]["mask_a"])


POSITIONS = """
name: halves4d
seed: 5
repeats: 1
sample: dummy_dot
forward: toy_4d
noise:
  - {name: poisson_dose, params: {electrons_per_pattern: 900}}
  - {name: half_sets, params: {split: positions}}
reconstructors: [toy_masked_sum]
quantifiers: [halves_probe]
"""


def test_runner_positions_split_and_refusals(reg, tmp_path):
    res = run_scenario(parse_scenario(POSITIONS), out=tmp_path / "ok", progress=False, report=False)
    assert (res.table["status"] == "ok").all(), res.table.get("error")
    (arr,) = _arrays(res.run_dir, res.table)
    full, a, b = arr["halves_probe.full"], arr["halves_probe.half_a"], arr["halves_probe.half_b"]
    assert np.array_equal(np.isnan(a), ~np.isnan(b))
    assert np.array_equal(np.where(np.isnan(a), b, a), full)
    # a grid-only reconstructor is refused before anything is written
    with pytest.raises(TembenchError, match="toy_grid_only.*needs the full scan grid.*split: dose"):
        run_scenario(parse_scenario(POSITIONS.replace("[toy_masked_sum]", "[toy_grid_only]")),
                     out=tmp_path / "refused", progress=False, report=False)
    assert not (tmp_path / "refused").exists()
    # half_sets must be last in the chain
    late = SCENARIO.replace("  - half_sets\n", "  - half_sets\n  - {name: dummy_noise, params: {sigma: 0.1}}\n")
    with pytest.raises(TembenchError, match="after `half_sets`.*last step"):
        run_scenario(parse_scenario(late), out=tmp_path / "late", progress=False, report=False)
    assert not (tmp_path / "late").exists()


def test_tables_equal_with_and_without_cache_hits(reg, tmp_path):
    sc = parse_scenario(SCENARIO)
    a = run_scenario(sc, out=tmp_path, progress=False, report=False).table
    # a different quantifier list → a new run that takes every reconstruction (full and halves) from the cache
    other = parse_scenario(SCENARIO.replace("[halves_probe, dummy_mean]", "[dummy_mean, halves_probe]"))
    calls = dummy_plugin.CALLS["reconstruct"]
    b = run_scenario(other, out=tmp_path, progress=False, report=False).table
    assert dummy_plugin.CALLS["reconstruct"] == calls and b["recon_cache_hit"].all()
    pd.testing.assert_series_equal(a["mean"], b["mean"])


def test_full_reconstruction_is_shared_across_splits_and_halves_are_not(reg, tmp_path, monkeypatch):
    """The full-data reconstruction's input is the data before the split, so a sweep over the split
    reconstructs it once (and a run without the split reuses it); each split's halves are their own."""
    from tembench import runner as runner_mod

    seen = []
    original = MaskedSum.reconstruct

    def counting(self, measurement, params, xp):
        seen.append(measurement.extras.get("half_index", "full"))
        return original(self, measurement, params, xp)

    monkeypatch.setattr(MaskedSum, "reconstruct", counting)
    sweep = POSITIONS + "sweep:\n  grid:\n    noise.1.n_subsets: [2, 4]\n"
    res = run_scenario(parse_scenario(sweep), out=tmp_path / "sweep", progress=False, report=False)
    t = res.table.sort_values("point_index")
    assert (t["status"] == "ok").all(), t.get("error")
    assert sorted(seen, key=str) == [0, 0, 1, 1, "full"]  # the full data once, each split's halves
    arrs = []
    for rel in t["artifacts"]:
        with np.load(res.run_dir / rel) as z:
            arrs.append({k: z[k] for k in z.files})
    assert np.array_equal(arrs[0]["halves_probe.full"], arrs[1]["halves_probe.full"])
    assert not np.array_equal(arrs[0]["halves_probe.half_a"], arrs[1]["halves_probe.half_a"], equal_nan=True)
    # the second point's full reconstruction came from the first point's cache entry, its halves did not
    keys = [runner_mod.stage_keys(p.spec, reg, 0) for p in parse_scenario(sweep).points]
    rk = [k.recon["toy_masked_sum"] for k in keys]
    assert rk[0] == rk[1]
    assert runner_mod.half_recon_key(rk[0], 0, keys[0].noise) != runner_mod.half_recon_key(rk[1], 0, keys[1].noise)
    # the same data without the split: the same full key (its cache entry is reused)
    plain = parse_scenario(POSITIONS.replace("  - {name: half_sets, params: {split: positions}}\n", ""))
    assert runner_mod.stage_keys(plain.points[0].spec, reg, 0).recon["toy_masked_sum"] == rk[0]
