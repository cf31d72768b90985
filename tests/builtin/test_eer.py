"""Electron-event representation: lossless round trips, RLE, compression, the `electron_events` model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench.builtin.noise_eer import ElectronEventsConversion
from tembench.eer import ElectronEvents, RunLengthEvents, events_of
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement


def _counts(rng, shape=(6, 5, 12, 10), lam=0.3):
    return rng.poisson(lam, size=shape).astype(np.float32)


def test_round_trip_dense_is_exact_and_layout_is_csr():
    rng = np.random.default_rng(0)
    c = _counts(rng)
    c[2, 3] = 0  # an empty frame
    c[0, 0, 4, 7] = 5  # several electrons in one pixel
    ev = ElectronEvents.from_dense(c)
    assert ev.indices.dtype == np.uint16 and ev.offsets.dtype == np.uint32
    assert ev.n_events == int(c.sum())
    assert np.array_equal(ev.counts_per_frame, c.reshape(30, -1).sum(1).astype(int))
    # frame (0, 0) lists linear index 4*10+7 five times
    f0 = ev.indices[ev.offsets[0]:ev.offsets[1]]
    assert np.count_nonzero(f0 == 47) == 5
    assert np.array_equal(ev.to_dense(), c)
    # chunked conversion gives the same thing
    ev2 = ElectronEvents.from_dense(c, chunk_frames=4)
    assert np.array_equal(ev2.indices, ev.indices) and np.array_equal(ev2.offsets, ev.offsets)
    assert np.array_equal(ev.to_dense(chunk_frames=3), c)


def test_rle_round_trip_matches_figure_1():
    # Pelz Fig. 1b/c: indices 27, 5673, 7985, 12552 encode as gaps 27, 5646, 2312, 4567
    det = (128, 128)
    offsets = np.array([0, 4, 4, 6], dtype=np.uint32)
    idx = np.array([27, 5673, 7985, 12552, 53, 4689], dtype=np.uint16)
    ev = ElectronEvents(offsets, idx, (1, 3), det, sorted_within_frames=True)
    rle = ev.to_rle()
    assert rle.gaps.tolist() == [27, 5646, 2312, 4567, 53, 4636]
    back = rle.to_events()
    assert np.array_equal(back.indices, idx) and np.array_equal(back.offsets, offsets)


def test_rle_round_trip_random_and_unsorted_input():
    rng = np.random.default_rng(1)
    c = _counts(rng, (7, 9, 16, 16), 0.05)
    ev = ElectronEvents.from_dense(c)
    rle = ev.to_rle()
    assert isinstance(rle, RunLengthEvents)
    assert np.array_equal(rle.to_events().to_dense(), c)
    # shuffle within frames: sorting restores the same RLE
    shuffled = ev.indices.copy()
    off = ev.offsets.astype(int)
    for f in range(ev.n_frames):
        rng.shuffle(shuffled[off[f]:off[f + 1]])
    ev_s = ElectronEvents(ev.offsets, shuffled, ev.scan_shape, ev.detector_shape)
    assert ev_s.equals(ev)
    assert np.array_equal(ev_s.to_rle().gaps, rle.gaps)


@pytest.mark.parametrize("e_per_pattern", [1, 10, 100])
def test_compression_vs_dense_at_low_dose(e_per_pattern):
    # 64x64 detector: dense float32 is 16 KiB/frame; EER costs 2 B per electron + 4 B per frame
    rng = np.random.default_rng(2)
    n_frames, det = 64, (64, 64)
    p = rng.random(det)
    p /= p.sum()
    c = rng.multinomial(e_per_pattern, p.ravel(), size=n_frames).reshape(8, 8, *det).astype(np.float32)
    ev = ElectronEvents.from_dense(c)
    expected = (n_frames * det[0] * det[1] * 4) / (2 * e_per_pattern * n_frames + 4 * (n_frames + 1))
    assert ev.dense_nbytes() / ev.nbytes == pytest.approx(expected, rel=1e-12)
    assert ev.dense_nbytes() / ev.nbytes > 60  # ≥ 60x smaller even at 100 e/pattern
    rle = ev.to_rle()
    assert rle.nbytes == ev.nbytes  # same width here (uint16 gaps)


def test_large_detector_uses_uint32_indices():
    c = np.zeros((1, 2, 300, 300), np.float32)
    c[0, 1, 299, 299] = 2
    ev = ElectronEvents.from_dense(c)
    assert ev.indices.dtype == np.uint32
    assert ev.indices.tolist() == [299 * 300 + 299] * 2
    assert np.array_equal(ev.to_dense(), c)


def test_bad_input_is_rejected_with_clear_errors():
    with pytest.raises(TembenchError, match="whole numbers"):
        ElectronEvents.from_dense(np.full((1, 1, 2, 2), 0.5, np.float32))
    with pytest.raises(TembenchError, match="4-D"):
        ElectronEvents.from_dense(np.zeros((3, 3)))
    with pytest.raises(TembenchError, match="offsets"):
        ElectronEvents(np.array([0, 3]), np.array([1, 2], np.uint16), (1, 2), (2, 2))
    with pytest.raises(TembenchError, match="n_pixels"):
        ElectronEvents(np.array([0, 1]), np.array([9], np.uint16), (1, 1), (2, 2))


def _stem_measurement(rng, counted_dose=True):
    data = rng.random((4, 5, 8, 8)).astype(np.float32)
    data /= data.sum(axis=(2, 3), keepdims=True)
    geo = Geometry(energy_keV=200.0, semiangle_mrad=20.0, scan_step_A=(0.5, 0.5),
                   detector_sampling_mrad=(2.0, 2.0), sampling_A=(0.1, 0.1))
    m = Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)
    if counted_dose:
        m = PoissonDose().apply(m, PoissonDose.Params(electrons_per_pattern=30), rng)
    return m


def test_electron_events_noise_model_keeps_geometry_and_counts():
    rng = np.random.default_rng(3)
    m = _stem_measurement(rng)
    out = ElectronEventsConversion().apply(m, ElectronEventsConversion.Params(), rng)
    assert out.kind == "eer" and out.data is None and out.counted
    assert out.geometry is m.geometry
    ev = events_of(out)
    assert np.array_equal(ev.to_dense(), m.data)
    rec = out.provenance[-1]
    assert rec["n_events"] == int(m.data.sum())
    assert math.isclose(rec["compression_vs_float32"], ev.dense_nbytes() / ev.nbytes)


def test_electron_events_requires_counted_data():
    rng = np.random.default_rng(4)
    m = _stem_measurement(rng, counted_dose=False)
    with pytest.raises(TembenchError, match="poisson_dose"):
        ElectronEventsConversion().apply(m, ElectronEventsConversion.Params(), rng)
    with pytest.raises(TembenchError, match="electron events"):
        events_of(m)
