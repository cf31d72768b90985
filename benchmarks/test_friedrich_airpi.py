"""AIRPI speed (Friedrich 2023 §4.2.4, Table 5.1): inference patterns/s on the CPU, and training time.

Run: ``python -m pytest benchmarks/test_friedrich_airpi.py -s`` (needs the ``nn`` extra). Timed, interleaved,
best of rounds, wall and CPU time of the process:

- ``network``: the shipped U-Net (data/airpi_v2) on batches of 256 network inputs (13 × 32 × 32) — the
  thesis's CNN alone ran > 750 000 samples in ≈ 6 min of training on an RTX 3080 and was estimated to
  allow > 2 kHz live;
- ``whole``: :func:`airpi.reconstruct_airpi` on a 34 × 34 scan of 64 × 64-pixel patterns (1024 patches):
  rebinning onto the frame, 3×3 kernels, inputs, network, two FFTs per patch and the stitching;
- ``fft_floor``: one 32 × 32 complex FFT per pattern (numpy), for scale.
- training: one optimiser step (batch 16, loss eq 4.11) and the training time recorded in the weights'
  sidecar (the shipped run, data generation included).

Measured: see docs/airpi.md (with the load).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from _timing import interleaved_min_wall_cpu
import pytest

pytest.importorskip("jax")

from tembench_friedrich2023 import airpi as A  # noqa: E402
from tembench_pelz2022.eer_ops import DetectorGrid  # noqa: E402

SCAN = 34
DET = 64
BATCH = 256


def _best(fns: dict, rounds: int = 3) -> dict:
    return interleaved_min_wall_cpu(fns, rounds)


def test_airpi_inference_and_training_speed():
    rng = np.random.default_rng(0)
    probe_k = A.probe_frame(300.0, 20.0, {"C30": 1.0e4, "C10": -16.2})
    cbed = np.abs(probe_k) ** 2
    kern = rng.poisson(np.broadcast_to(cbed * 0.2, (BATCH, 3, 3, 32, 32))).astype(np.float32)
    inputs = A.network_inputs(kern, probe_k, 0.2, A.has_dose_input())  # v2: 13 channels (the dose input)
    data = rng.poisson(0.05, (SCAN, SCAN, DET, DET)).astype(np.float32)
    data[..., 16:48, 16:48] += rng.poisson(np.broadcast_to(cbed * 0.2, (SCAN, SCAN, 32, 32)))
    grid = DetectorGrid((DET, DET), (32.0, 32.0), (2.5, 2.5))
    n_whole = (SCAN - 2) ** 2
    fr = (rng.standard_normal((BATCH, 32, 32)) + 0j).astype(np.complex64)
    A.predict_waves(inputs)  # compile

    res = _best({
        "network": lambda: A.predict_waves(inputs),
        "whole": lambda: A.reconstruct_airpi(data, grid, 0.2, 300.0, 20.0, {"C30": 1.0e4, "C10": -16.2}),
        "fft_floor": lambda: np.fft.fft2(fr),
    })
    rate = {"network": BATCH, "whole": n_whole, "fft_floor": BATCH}
    print(f"\nload {os.getloadavg()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for k in rate:
        print(f"{k:10s} {rate[k] / res['wall'][k]:10.0f} patterns/s wall, {rate[k] / res['cpu'][k]:10.0f} patterns/s CPU")
    print(f"whole / network (wall): {res['wall']['whole'] / n_whole / (res['wall']['network'] / BATCH):.2f}")

    import jax
    import optax

    from tembench_friedrich2023 import airpi_train as T

    data_t = T.make_dataset(2, 1, log=lambda m: None)
    x, y, pz = T.sample_batch(data_t, rng, T.BATCH)
    loss = T.make_loss(A.forward)
    params = {k: jax.numpy.asarray(v) for k, v in A.init_params(0).items()}
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        (l, _), g = jax.value_and_grad(loss, has_aux=True)(p, x, y.real, y.imag, pz.real, pz.imag)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    params, state, l = step(params, state)
    jax.block_until_ready(l)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(10):
        params, state, l = step(params, state)
    jax.block_until_ready(l)
    print(f"training step (batch {T.BATCH}): {(time.perf_counter() - t) / 10:.3f} s wall, "
          f"{(time.process_time() - c) / 10:.3f} s CPU")
    meta = A.weights_metadata()
    print(f"shipped training run: {json.dumps(meta.get('timing_s'))} s, {meta.get('optimizer', {}).get('steps')} steps")
    assert res["wall"]["network"] > 0
