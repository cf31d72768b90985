"""The scenario runner.

For each point of a sweep the runner builds the sample, simulates the noise-free measurement,
applies the noise chain per repeat, runs every reconstructor and every applicable quantifier,
and writes one row per (point, repeat, reconstructor).

* Work is done in two phases: first every distinct noise-free measurement (sample + forward
  model) is simulated once, in parallel across distinct ones; then the (point, repeat) units
  run, each reusing the cached measurement.
* Every stage result is cached on disk under a content hash of everything that produced it
  (component name, version and source fingerprint, parameters, seeds, upstream keys), so a
  re-run skips finished work and an interrupted sweep resumes.
* Each finished row is written at once, atomically, keyed by (point, repeat, reconstructor):
  a kill loses at most the units in flight and a re-run never duplicates a row.
* A failing stage is recorded in its rows (error + traceback) and the sweep goes on.
* Half sets: if the noise chain ends with ``half_sets``, every reconstructor also reconstructs
  halves A and B (each its own cached stage, keyed by :func:`half_recon_key`), and quantifiers
  see them as ``reconstruction.extras["half_sets"] = [A, B]``; the full-data reconstruction
  stays the main one. Its input is the data before the split, so its key chains the noise steps
  before ``half_sets``: a sweep over the split (e.g. ``n_subsets``) reconstructs the full data once.
* Aggregates: once every repeat of a point is finished (in this session or an earlier one), the
  main process calls ``aggregate`` of every quantifier with ``aggregates = True`` on the scores
  read back from the run folder, and writes ``aggregates.parquet`` / ``.csv``
  (one row per point × reconstructor × aggregating quantifier).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform as _platform
import re
import socket
import subprocess
import sys
import time
import tracemalloc
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import tembench
from tembench import emd, identity
from tembench.backend import asnumpy, get_array_module
from tembench.components import accepts_kind
from tembench.errors import RunDirectoryError, TembenchError
from tembench.executors import TaskLost, make_executor, note_computation, print_dashboard
from tembench.registry import Registry, get_registry
from tembench.scenario import Scenario, ScenarioSpec, check_executor, stable_hash
from tembench.store import RunStore, StageCache, check_output_folder, check_output_root, dumps
from tembench.types import HALF_SETS, HALF_SETS_STEP, full_measurement, half_measurement, has_half_sets

PREVIEW_MAX_PIXELS = 384


# --- identities -------------------------------------------------------------------------------
# A stage key and the run id cover everything a number depends on (see tembench.identity): the
# component's version and every file of its package and of the core, and the environment.
component_fingerprint = identity.component_fingerprint


def _component_id(registry: Registry, kind: str, comp) -> dict[str, Any]:
    cls = registry.get(kind, comp.name)
    params = cls.parse_params(comp.params).model_dump(mode="json")
    return {"name": comp.name, "fp": component_fingerprint(cls), "params": params}


@dataclass
class StageKeys:
    sample: str
    forward: str
    noise: str
    recon: dict[str, str]
    noise_steps: list[str] = field(default_factory=list)
    #: what seeds the random stages (:func:`rng_for`): the scenario's seed, the repeat and the components'
    #: names and parameters, but not their code fingerprints or the environment, so a change of code that
    #: leaves a stage's result alone (a faster runner, a new plugin module) draws the same sample and noise
    sample_seed: str = ""
    noise_step_seeds: list[str] = field(default_factory=list)


def stage_keys(spec: ScenarioSpec, registry: Registry, repeat: int, env: dict[str, Any] | None = None) -> StageKeys:
    """Content keys of every stage of one (point, repeat); each key chains the one before it."""
    env = identity.environment_identity(spec.device) if env is None else env
    s_id, f_id = _component_id(registry, "sample", spec.sample), _component_id(registry, "forward_model", spec.forward)
    sample = stable_hash({"stage": "sample", "c": s_id, "seed": spec.seed, "env": env})
    forward = stable_hash({"stage": "forward", "up": sample, "c": f_id})
    chain = [_component_id(registry, "noise_model", n) for n in spec.noise]
    noise = stable_hash({"stage": "noise", "up": forward, "seed": spec.seed, "repeat": repeat, "c": chain})
    # each step is seeded by the chain up to and including it, so appending a step (e.g. a
    # conversion to electron events) leaves the realisations of the steps before it unchanged
    steps = [stable_hash({"stage": "noise", "up": forward, "seed": spec.seed, "repeat": repeat, "c": chain[: i + 1]})
             for i in range(len(chain))]
    # the full-data reconstruction sees the data before a trailing `half_sets` split (the runner strips it)
    full_up = noise
    if spec.noise and spec.noise[-1].name == HALF_SETS_STEP:
        full_up = steps[-2] if len(steps) > 1 else forward
    recon = {r.key: stable_hash({"stage": "recon", "up": full_up, "c": _component_id(registry, "reconstructor", r)})
             for r in spec.reconstructors}
    named = {"sample": _seed_id(s_id), "forward": _seed_id(f_id)}
    seed_chain = [_seed_id(c) for c in chain]
    sample_seed = stable_hash({"stage": "sample", "c": named["sample"], "seed": spec.seed})
    step_seeds = [stable_hash({"stage": "noise", "up": named, "seed": spec.seed, "repeat": repeat,
                               "c": seed_chain[: i + 1]}) for i in range(len(seed_chain))]
    return StageKeys(sample, forward, noise, recon, steps, sample_seed, step_seeds)


def _seed_id(component_id: dict[str, Any]) -> dict[str, Any]:
    """A component as the random stages see it: its name and validated parameters (:func:`_component_id` without
    the code fingerprint)."""
    return {"name": component_id["name"], "params": component_id["params"]}


def half_recon_key(recon_key: str, index: int, split_key: str) -> str:
    """Stage key of the reconstruction of half set ``index`` (0 = A, 1 = B) of a reconstructor's input:
    the full reconstruction's key and the key of the noise chain with the split (``split_key``), since the
    full one does not depend on how the data are split."""
    return stable_hash({"stage": "recon_half", "up": recon_key, "split": split_key, "half": int(index)})


def rng_for(key: str, seed: int) -> np.random.Generator:
    """Deterministic generator from the scenario seed and a stage key."""
    return np.random.default_rng(np.random.SeedSequence([seed, int(key[:16], 16)]))


def row_key(point_index: int, point_id: str, repeat: int, label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    return f"p{point_index:05d}-{point_id}-r{repeat:03d}-{safe}"


# --- stage execution ---------------------------------------------------------------------------
def _measure(fn, track_memory: bool):
    """Run fn(); return (value, seconds, peak MB of traced allocations or nan)."""
    note_computation()  # a process pool started later in this process must not fork it
    started_tracing = False
    if track_memory and not tracemalloc.is_tracing():
        tracemalloc.start()
        started_tracing = True
    if track_memory:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        value = fn()
    finally:
        dt = time.perf_counter() - t0
        peak = float("nan")
        if track_memory:
            peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
            if started_tracing:
                tracemalloc.stop()
    return value, dt, peak


def _cached_stage(cache: StageCache, stage: str, key: str, fn, track_memory: bool):
    # a damaged entry is a miss (reported by the cache); a value the cache cannot store without
    # pickle is returned uncached — put() reports it and never fails the stage
    hit = cache.get(stage, key)
    if hit is not None:
        return hit["value"], hit["time_s"], hit["peak_MB"], True
    value, dt, peak = _measure(fn, track_memory)
    cache.put(stage, key, {"value": value, "time_s": dt, "peak_MB": peak})
    return value, dt, peak, False


def _sample(spec: ScenarioSpec, registry: Registry, cache: StageCache, keys: StageKeys):
    s_cls = registry.get("sample", spec.sample.name)
    return _cached_stage(
        cache, "sample", keys.sample,
        lambda: s_cls().build(s_cls.parse_params(spec.sample.params), rng_for(keys.sample_seed, spec.seed)), False)


def _simulate(spec: ScenarioSpec, registry: Registry, cache: StageCache, keys: StageKeys, track_memory: bool):
    f_cls = registry.get("forward_model", spec.forward.name)
    xp = get_array_module(spec.device)
    sample, t_sample, _, _ = _sample(spec, registry, cache, keys)
    measurement, t_sim, peak_sim, _ = _cached_stage(
        cache, "forward", keys.forward,
        lambda: _stamp(f_cls().simulate(sample, f_cls.parse_params(spec.forward.params), xp), f_cls, spec.forward.params),
        track_memory)
    return sample, measurement, t_sample, t_sim, peak_sim


def _stamp(measurement, cls, params: dict[str, Any]):
    measurement.provenance = list(measurement.provenance) + [
        {"kind": cls.kind, "name": cls.name, "version": cls.version, "params": params}]
    return measurement


def _apply_noise(spec: ScenarioSpec, registry: Registry, measurement, step_seeds: list[str]):
    for n, key in zip(spec.noise, step_seeds):
        rng = rng_for(key, spec.seed)
        cls = registry.get("noise_model", n.name)
        if has_half_sets(measurement):
            raise TembenchError(f"noise step {n.name!r} comes after the split into half sets; `half_sets` must be "
                                "the last step of the noise chain (move it to the end)")
        if not accepts_kind(cls.accepts, measurement.kind):
            raise TypeError(f"noise model {n.name!r} does not accept measurement kind {measurement.kind!r}")
        measurement = _stamp(cls().apply(measurement, cls.parse_params(n.params), rng), cls, n.params)
    return measurement


def reconstructor_params(r_cls, r, seed: int, repeat: int):
    """The reconstructor's validated params; a ``seed`` param left null (``None``) is set to a seed derived
    from the scenario seed, the repeat and the reconstructor key, so random choices inside a reconstructor
    (tilt order, minibatch order) follow the scenario's seed and differ between repeats."""
    params = r_cls.parse_params(r.params)
    if "seed" in type(params).model_fields and getattr(params, "seed") is None:
        tag = int.from_bytes(hashlib.blake2b(r.key.encode(), digest_size=8).digest(), "little")
        derived = int(np.random.SeedSequence([int(seed), int(repeat), tag]).generate_state(1)[0])
        params = params.model_copy(update={"seed": derived})
    return params


def _reconstruct_half(r_cls, r, params, noisy, index: int, xp):
    if noisy.extras[HALF_SETS].get("split") == "positions" and not r_cls.supports_pattern_mask:
        raise TembenchError(_positions_refusal(r.name))
    return r_cls().reconstruct(half_measurement(noisy, index), params, xp)


def _positions_refusal(name: str) -> str:
    return (f"reconstructor {name!r} needs the full scan grid and cannot reconstruct a `half_sets` half with "
            "`split: positions` (half the probe positions, marked by extras['pattern_mask']). Use "
            "`split: dose`, or a reconstructor that supports scattered positions (supports_pattern_mask = True).")


def _preview(recon) -> dict[str, np.ndarray]:
    data = np.asarray(asnumpy(recon.data), dtype=np.float32)
    if recon.kind == "volume":
        nz, ny, nx = data.shape
        out = {"preview": data.sum(axis=0), "slice_xy": data[nz // 2], "slice_xz": data[:, ny // 2, :],
               "slice_yz": data[:, :, nx // 2]}
    else:
        out = {"preview": data}
    for k, v in out.items():
        step = int(np.ceil(max(v.shape) / PREVIEW_MAX_PIXELS))
        if step > 1:
            out[k] = v[::step, ::step]
    return out


# --- units of work --------------------------------------------------------------------------
@dataclass
class ForwardTask:
    spec: dict[str, Any]
    cache_root: str
    use_cache: bool
    track_memory: bool


@dataclass
class UnitTask:
    point_index: int
    point_id: str
    values: dict[str, Any]
    spec: dict[str, Any]
    repeat: int
    cache_root: str
    run_dir: str
    run_id: str
    use_cache: bool
    track_memory: bool
    forward_error: str | None = None
    worker_error: str | None = None  # set by the main process when the task's worker died repeatedly


@dataclass
class UnitResult:
    point_index: int
    repeat: int
    values: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def run_forward_task(task: ForwardTask) -> tuple[str, str | None]:
    """Simulate (and cache) one noise-free measurement; return (forward key, error or None)."""
    registry = get_registry()
    spec = ScenarioSpec.model_validate(task.spec)
    keys = stage_keys(spec, registry, 0)
    cache = StageCache(Path(task.cache_root), task.use_cache)
    try:
        _simulate(spec, registry, cache, keys, task.track_memory)
        return keys.forward, None
    except Exception as exc:  # noqa: BLE001 - recorded in the rows
        return keys.forward, _format_error(exc)


def _format_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc))


# memo of the last noise-free measurement per process, so a serial sweep over dose does not
# verify and decode the same cache entry for every unit
_last_forward: dict[str, Any] = {}


def run_unit(task: UnitTask) -> UnitResult:
    """Noise chain → every reconstructor → every quantifier for one (point, repeat)."""
    registry = get_registry()
    spec = ScenarioSpec.model_validate(task.spec)
    keys = stage_keys(spec, registry, task.repeat)
    cache = StageCache(Path(task.cache_root), task.use_cache)
    store = RunStore(Path(task.run_dir))
    result = UnitResult(task.point_index, task.repeat, task.values)
    _fft = identity.environment_identity(spec.device)["fft"]
    base = {
        "run_id": task.run_id, "scenario": spec.name, "point_index": task.point_index, "point_id": task.point_id,
        "repeat": task.repeat, **{k: _scalar(v) for k, v in task.values.items()},
        "sample": spec.sample.name, "forward_model": spec.forward.name,
        "noise_chain": "+".join(n.name for n in spec.noise),
        "sample_version": registry.get("sample", spec.sample.name).version,
        "forward_version": registry.get("forward_model", spec.forward.name).version,
        "tembench_version": tembench.__version__, "device": spec.device,
        "fft_library": _fft["library"], "deterministic": _fft.get("deterministic", "true") == "true",
    }

    def error_rows(stage: str, message: str) -> UnitResult:
        result.error = message
        for r in spec.reconstructors:
            rk = row_key(task.point_index, task.point_id, task.repeat, r.key)
            row = {**base, "reconstructor": r.key, "reconstructor_name": r.name,
                   "status": "error", "error_stage": stage, "error": message.splitlines()[0], "traceback": message}
            store.write_row(rk, row)
            result.rows.append(row)
        return result

    if task.forward_error:
        return error_rows("forward", task.forward_error)
    if task.worker_error:
        return error_rows("worker", task.worker_error)
    keys_rows = [row_key(task.point_index, task.point_id, task.repeat, r.key) for r in spec.reconstructors]
    if all(store.has_row(k) for k in keys_rows):
        # a task run again (its worker died after writing the rows): report the finished rows, compute nothing
        result.rows = [store.read_row(k) for k in keys_rows]
        result.error = next((r.get("traceback") or r.get("error") for r in result.rows if r.get("status") != "ok"),
                            None)
        return result
    t_unit = time.perf_counter()
    try:
        if keys.forward in _last_forward:
            sample, measurement, t_sample, t_sim, peak_sim = _last_forward[keys.forward]
        else:
            sample, measurement, t_sample, t_sim, peak_sim = _simulate(spec, registry, cache, keys, task.track_memory)
            _last_forward.clear()
            _last_forward[keys.forward] = (sample, measurement, t_sample, t_sim, peak_sim)
    except Exception as exc:  # noqa: BLE001
        return error_rows("forward", _format_error(exc))
    try:
        noisy, t_noise, _, _ = _cached_stage(
            cache, "noise", keys.noise, lambda: _apply_noise(spec, registry, measurement, keys.noise_step_seeds), False)
    except Exception as exc:  # noqa: BLE001
        return error_rows("noise", _format_error(exc))

    xp = get_array_module(spec.device)
    halves = has_half_sets(noisy)
    # reconstructors see the full data only, exactly as before the split (its cache key does not depend on the
    # split); the halves go through half_measurement()
    full = full_measurement(noisy)
    for r in spec.reconstructors:
        rk = row_key(task.point_index, task.point_id, task.repeat, r.key)
        if store.has_row(rk):
            continue
        r_cls = registry.get("reconstructor", r.name)
        row = {**base, "reconstructor": r.key, "reconstructor_name": r.name, "reconstructor_version": r_cls.version,
               "time_sample_s": t_sample, "time_simulate_s": t_sim, "peak_memory_simulate_MB": peak_sim,
               "time_noise_s": t_noise}
        try:
            r_params = reconstructor_params(r_cls, r, spec.seed, task.repeat)
            if "seed" in type(r_params).model_fields:
                row["reconstructor_seed"] = r_params.seed
            recon, t_rec, peak_rec, hit = _cached_stage(
                cache, "recon", keys.recon[r.key],
                lambda: r_cls().reconstruct(full, r_params, xp), task.track_memory)
            row.update(time_reconstruct_s=t_rec, peak_memory_reconstruct_MB=peak_rec, recon_cache_hit=hit)
            if halves:
                half_recons, t_halves, peak_halves, hits = [], 0.0, float("nan"), []
                for i in (0, 1):
                    rec_i, t_i, peak_i, hit_i = _cached_stage(
                        cache, "recon", half_recon_key(keys.recon[r.key], i, keys.noise),
                        lambda i=i: _reconstruct_half(r_cls, r, r_params, noisy, i, xp), task.track_memory)
                    half_recons.append(rec_i)
                    t_halves += t_i
                    peak_halves = peak_i if math.isnan(peak_halves) else max(peak_halves, peak_i)
                    hits.append(hit_i)
                # recon_cache_hit: the full reconstruction and both halves came from the cache
                row.update(time_reconstruct_halves_s=t_halves, peak_memory_reconstruct_halves_MB=peak_halves,
                           recon_cache_hit=hit and all(hits))
                recon = dataclasses.replace(recon, extras={**recon.extras, HALF_SETS: half_recons})
            for hk, hv in recon.history.items():
                if len(hv):
                    row[f"final_{hk}"] = float(hv[-1])
                    row[f"n_{hk}"] = len(hv)
            arrays = {f"recon_{k}": v for k, v in _preview(recon).items()}
            arrays.update({f"history_{k}": np.asarray(v, dtype=np.float64) for k, v in recon.history.items()})
            t0 = time.perf_counter()
            scores: dict[str, dict[str, Any]] = {}  # what aggregating quantifiers returned, for aggregate()
            for q in spec.quantifiers:
                q_cls = registry.get("quantifier", q.name)
                if not accepts_kind(q_cls.accepts, recon.kind):
                    continue
                metrics = q_cls().score(recon, noisy, sample, q_cls.parse_params(q.params))
                kept = scores[q.key] = {"scalars": {}, "arrays": {}, "order": list(metrics)}
                for mk, mv in metrics.items():
                    col = mk if mk not in row else f"{q.key}.{mk}"
                    if isinstance(mv, (np.ndarray, list, tuple)):
                        arrays[f"{q.key}.{mk}"] = np.asarray(mv)
                        kept["arrays"][mk] = f"{q.key}.{mk}"
                    else:
                        row[col] = _scalar(mv)
                        kept["scalars"][mk] = mv.item() if isinstance(mv, np.generic) else mv
                if not q_cls.aggregates:
                    del scores[q.key]
            row["time_score_s"] = time.perf_counter() - t0
            row["artifacts"] = store.write_artifacts(rk, arrays)
            saved = emd.save_outputs(task.run_dir, rk, spec, recon, noisy, task.values, r.key)
            if saved is not None:
                row["emd_file"] = saved
            if scores:
                store.write_scores(rk, scores)
            row["status"] = "ok"
            row["error"] = ""
        except Exception as exc:  # noqa: BLE001 - the sweep goes on
            msg = _format_error(exc)
            row.update(status="error", error_stage="reconstruct/score", error=msg.splitlines()[0], traceback=msg)
            result.error = result.error or msg
        row["wall_time_s"] = time.perf_counter() - t_unit
        store.write_row(rk, row)
        result.rows.append(row)
    return result


# --- aggregates over a point's repeats ------------------------------------------------------------
def aggregate_key(point_index: int, point_id: str, reconstructor: str, quantifier: str) -> str:
    safe = [re.sub(r"[^A-Za-z0-9_.-]+", "_", x) for x in (reconstructor, quantifier)]
    return f"p{point_index:05d}-{point_id}-{safe[0]}-{safe[1]}-{stable_hash([reconstructor, quantifier])[:6]}"


class Aggregator:
    """Runs ``aggregate`` of every aggregating quantifier once all repeats of a point are finished.

    Runs in the main process. Its inputs are always read back from the run folder (rows and the
    per-repeat scores), ordered by repeat index, so a fresh, resumed, serial or parallel run gives
    the same aggregate rows. An existing aggregate row is never recomputed or overwritten.
    """

    def __init__(self, scenario: Scenario, registry: Registry, store: RunStore, run_id: str, cache: StageCache,
                 env: dict[str, Any]) -> None:
        self.registry, self.store, self.run_id, self.cache, self.env = registry, store, run_id, cache, env
        self.points = {p.index: p for p in scenario.points}
        self.done: set[int] = set()
        self.enabled = any(registry.get("quantifier", q.name).aggregates
                           for p in scenario.points for q in p.spec.quantifiers)

    def point_finished(self, point_index: int) -> None:
        if not self.enabled or point_index in self.done:
            return
        try:
            if self._point(self.points[point_index]):
                self.done.add(point_index)
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable row file; errors of aggregate() are rows
            print(f"[tembench] aggregates of point {point_index} not computed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            self.done.add(point_index)

    def finish(self) -> None:
        for index in sorted(self.points):
            self.point_finished(index)

    def _point(self, point) -> bool:
        """Aggregate one point if all its rows exist; True when nothing is left to do for it."""
        spec = point.spec
        aggs = [(q, self.registry.get("quantifier", q.name)) for q in spec.quantifiers]
        aggs = [(q, cls) for q, cls in aggs if cls.aggregates]
        if not aggs:
            return True
        keys = {(r.key, rep): row_key(point.index, point.point_id, rep, r.key)
                for r in spec.reconstructors for rep in range(spec.repeats)}
        if not all(self.store.has_row(k) for k in keys.values()):
            return False
        sample: list[Any] = []
        for r in spec.reconstructors:
            todo = [(q, cls) for q, cls in aggs
                    if not self.store.has_aggregate(aggregate_key(point.index, point.point_id, r.key, q.key))]
            if not todo:
                continue
            rows = [(rep, self.store.read_row(keys[r.key, rep])) for rep in range(spec.repeats)]
            scores: dict[int, Any] = {}
            for q, q_cls in todo:
                self._one(point, spec, r, q, q_cls, rows, scores, sample)
        return True

    def _one(self, point, spec: ScenarioSpec, r, q, q_cls, rows, scores: dict[int, Any], sample: list[Any]) -> None:
        key = aggregate_key(point.index, point.point_id, r.key, q.key)
        row: dict[str, Any] = {
            "run_id": self.run_id, "scenario": spec.name, "point_index": point.index, "point_id": point.point_id,
            **{k: _scalar(v) for k, v in point.values.items()},
            "reconstructor": r.key, "reconstructor_name": r.name, "quantifier": q.key, "quantifier_name": q.name,
            "quantifier_version": q_cls.version,
        }
        t0 = time.perf_counter()
        try:
            repeats, used, failed = [], [], []
            for rep, res_row in rows:
                if res_row.get("status") != "ok":
                    failed.append(rep)
                    continue
                if rep not in scores:  # no scores file: no aggregating quantifier applied to this reconstruction
                    rk = row_key(point.index, point.point_id, rep, r.key)
                    scores[rep] = self.store.read_scores(rk, res_row) if self.store.scores_path(rk).exists() else {}
                if q.key in scores[rep]:
                    repeats.append(scores[rep][q.key])
                    used.append(rep)
            if not used and not failed:
                return  # the quantifier does not apply to this reconstructor's output: no row
            row.update(n_repeats=len(used), n_repeats_failed=len(failed), repeats=dumps(used).replace("\n", ""))
            if not used:
                raise TembenchError(f"no repeat of point {point.index} with reconstructor {r.key!r} finished without "
                                    "error (see the results table), so there is nothing to aggregate")
            if not sample:
                sample.append(_sample(spec, self.registry, self.cache, stage_keys(spec, self.registry, 0, self.env))[0])
            out = q_cls().aggregate(repeats, sample[0], q_cls.parse_params(q.params))
            if not isinstance(out, dict):
                raise TembenchError(f"quantifier {q.name!r}: aggregate() must return a dict, got {type(out).__name__}")
            arrays: dict[str, np.ndarray] = {}
            for mk, mv in out.items():
                if isinstance(mv, (np.ndarray, list, tuple)):
                    arrays[mk] = np.asarray(mv)
                else:
                    row[mk if mk not in row else f"{q.key}.{mk}"] = _scalar(mv)
            row["artifacts"] = self.store.write_aggregate_artifacts(key, arrays)
            row.update(status="ok", error="")
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            msg = _format_error(exc)
            row.update(status="error", error_stage="aggregate", error=msg.splitlines()[0], traceback=msg)
        row["time_aggregate_s"] = time.perf_counter() - t0
        self.store.write_aggregate(key, row)


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (list, tuple, dict)):
        return dumps(v).replace("\n", "")
    return v


# --- the run -----------------------------------------------------------------------------------
def _components_of(spec: ScenarioSpec):
    return ([("sample", spec.sample), ("forward_model", spec.forward)] + [("noise_model", n) for n in spec.noise]
            + [("reconstructor", r) for r in spec.reconstructors] + [("quantifier", q) for q in spec.quantifiers])


def run_identity(scenario: Scenario, registry: Registry) -> dict[str, Any]:
    """Everything the run id hashes: the scenario, every component's code fingerprint, the environment."""
    spec = scenario.spec
    return {
        "spec": spec.model_dump(mode="json", exclude={"executor", "output", "description"}),
        "components": {f"{kind}:{c.name}": component_fingerprint(registry.get(kind, c.name))
                       for kind, c in _components_of(spec)},
        "packages": {mod: identity.package_fingerprint(mod) for mod in sorted(
            {"tembench"} | {registry.get(kind, c.name).__module__.split(".")[0] for kind, c in _components_of(spec)})},
        "environment": identity.environment_identity(spec.device),
        "tembench": tembench.__version__,
    }


def component_modules(spec: ScenarioSpec, registry: Registry) -> list[str]:
    """The modules of the scenario's components plus the engine modules every unit runs (what a pool
    worker imports before its first task, :meth:`ProcessExecutor.prestart`)."""
    mods = ["tembench.runner", "tembench.store", "tembench.cache"]
    for kind, c in _components_of(spec):
        try:
            mods.append(registry.get(kind, c.name).__module__)
        except Exception:  # noqa: BLE001 - an unknown component is reported by the run itself
            continue
    return list(dict.fromkeys(mods))


def run_id_for(scenario: Scenario, registry: Registry) -> str:
    return "run-" + stable_hash(run_identity(scenario, registry))[:12]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tembench.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _machine() -> dict[str, Any]:
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {"hostname": socket.gethostname(), "platform": _platform.platform(), "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "memory_GiB": mem, "numpy": np.__version__}


def check_half_sets(scenario: Scenario, registry: Registry) -> None:
    """Before anything runs: ``half_sets`` is the last noise step, and a ``split: positions`` goes
    only to reconstructors that support scattered positions."""
    for point in scenario.points:
        spec = point.spec
        for i, n in enumerate(spec.noise):
            if n.name != HALF_SETS_STEP:
                continue
            if i != len(spec.noise) - 1:
                after = ", ".join(repr(m.name) for m in spec.noise[i + 1:])
                raise TembenchError(f"scenario {spec.name!r}: noise step {after} comes after `half_sets`; the split "
                                    "into half sets must be the last step of the noise chain (move it to the end)")
            split = registry.get("noise_model", n.name).parse_params(n.params).split
            for r in spec.reconstructors:
                if split == "positions" and not registry.get("reconstructor", r.name).supports_pattern_mask:
                    raise TembenchError(f"scenario {spec.name!r}: " + _positions_refusal(r.name))


@dataclass
class RunResult:
    run_dir: Path
    table: Any
    n_units: int
    n_computed: int
    n_errors: int


def run_scenario(scenario: Scenario, *, out: str | Path | None = None, run_id: str | None = None,
                 executor: str | None = None, workers: int | None = None, use_cache: bool = True,
                 track_memory: bool = True, progress: bool = True, report: bool = True,
                 registry: Registry | None = None) -> RunResult:
    """Run (or resume) a validated scenario; return the run folder and its results table."""
    registry = registry or get_registry()
    _last_forward.clear()
    spec = scenario.spec
    kind = executor or scenario.executor or spec.executor.kind
    n_workers = workers or scenario.workers or spec.executor.workers
    check_executor(kind, n_workers, options=spec.executor)  # before anything is written
    check_half_sets(scenario, registry)
    root = check_output_folder(Path(out) if out is not None else scenario.output_root)
    # a dask cluster is started (or connected to, and its resources checked) before anything is written;
    # a local pool's workers start now and import the components' modules while this process computes the
    # run identity (pyFFTW, code fingerprints: ≈ 1 s)
    ex = make_executor(kind, n_workers, spec.executor.address, options=spec.executor, device=spec.device)
    try:
        if hasattr(ex, "prestart"):
            ex.prestart(component_modules(spec, registry))
        ident = run_identity(scenario, registry)
        rid = run_id or "run-" + stable_hash(ident)[:12]
        run_dir = root / rid
        scenario_hash = stable_hash(spec.model_dump(mode="json", exclude={"executor", "output"}))
        store = RunStore(run_dir)
        existing = store.read_manifest()
        if existing is not None and existing.get("scenario_hash") != scenario_hash:
            raise RunDirectoryError(
                f"run folder {str(run_dir)!r} holds a run of a different scenario "
                f"({existing.get('scenario')!r}, hash {str(existing.get('scenario_hash'))[:12]}). Nothing was "
                f"changed. Choose another --run-id or output folder.")
        root.mkdir(parents=True, exist_ok=True)
        check_output_root(root, spec.name)
        cache_root = root / ".cache"
        manifest = _start_session(store, existing, scenario, spec, scenario_hash, rid, ident, kind, n_workers)
    except BaseException:
        ex.close()
        raise
    try:
        return _run(scenario, spec, registry, store, ex, manifest, rid, run_dir, cache_root, kind, use_cache,
                    track_memory, progress, report)
    finally:
        ex.close()


def _start_session(store: RunStore, existing, scenario: Scenario, spec: ScenarioSpec, scenario_hash: str, rid: str,
                   ident, kind: str, n_workers: int) -> dict[str, Any]:
    manifest = existing or {
        "scenario": spec.name, "scenario_hash": scenario_hash, "run_id": rid,
        "scenario_file": str(scenario.path) if scenario.path else None, "scenario_text": scenario.source,
        "swept": scenario.swept, "repeats": spec.repeats, "n_points": len(scenario.points),
        "reconstructors": [r.key for r in spec.reconstructors],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "identity": ident,
        "git_commit": _git_commit(), "machine": _machine(),
    }
    manifest["status"] = "running"
    manifest.setdefault("sessions", []).append(
        {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "executor": kind, "workers": n_workers if kind != "serial" else 1})
    store.write_manifest(manifest)
    return manifest


def _forward_weight(spec: ScenarioSpec, registry: Registry) -> float:
    """Estimated size of a noise-free simulation (its preflight peak bytes; 0 when unknown): heavy ones go first."""
    try:
        s_cls, f_cls = registry.get("sample", spec.sample.name), registry.get("forward_model", spec.forward.name)
        s_fp = s_cls.preflight(s_cls.parse_params(spec.sample.params), None) if hasattr(s_cls, "preflight") else None
        f_fp = f_cls.preflight(f_cls.parse_params(spec.forward.params), s_fp) if hasattr(f_cls, "preflight") else None
        return float(getattr(f_fp, "peak_bytes", None) or 0)
    except Exception:  # noqa: BLE001 - only an ordering hint
        return 0.0


def _lost_message(lost: TaskLost) -> str:
    return (f"WorkerLost: {lost}. The task was run again on other workers and each of them died; this usually "
            "means the unit needs more memory than a worker has (memory_limit) or crashes the interpreter.")


def _run(scenario: Scenario, spec: ScenarioSpec, registry: Registry, store: RunStore, ex, manifest: dict[str, Any],
         rid: str, run_dir: Path, cache_root: Path, kind: str, use_cache: bool, track_memory: bool, progress: bool,
         report: bool) -> RunResult:
    units: list[UnitTask] = []
    for point in scenario.points:
        spec_dict = point.spec.model_dump(mode="python")
        for repeat in range(spec.repeats):
            keys = [row_key(point.index, point.point_id, repeat, r.key) for r in spec.reconstructors]
            if all(store.has_row(k) for k in keys):
                continue
            units.append(UnitTask(point.index, point.point_id, point.values, spec_dict, repeat, str(cache_root),
                                  str(run_dir), rid, use_cache, track_memory))
    n_done = scenario.n_units - len(units)

    n_errors = 0
    hook = registry.hook()
    env = identity.environment_identity(spec.device)  # one environment for every key of this run
    aggregator = Aggregator(scenario, registry, store, rid, StageCache(cache_root, use_cache), env)
    from tembench.metrics import catalog_for_spec

    catalog = catalog_for_spec(spec, registry)  # units and directions in results.parquet's column metadata
    print_dashboard(ex, progress)
    with ex:
        # phase 1: each distinct noise-free measurement once, the heaviest first; workers write it
        # to the stage cache (a shared folder) and units read it from there, never through the scheduler
        # A simulation that only one unit needs is not a task of its own: that unit simulates on first use
        # (as serially), so it does not wait for the other simulations of phase 1 (two heavy Ren points on
        # two workers: 0.4 s of a 13 s run)
        fwd_tasks: dict[str, ForwardTask] = {}
        fwd_weights: dict[str, float] = {}
        forward_key: dict[int, str] = {}
        specs = {}
        for u in units:
            s = specs[id(u)] = ScenarioSpec.model_validate(u.spec)
            forward_key[id(u)] = stage_keys(s, registry, 0, env).forward
        n_users = Counter(forward_key.values())
        weights: dict[str, float] = {}  # one preflight estimate per distinct simulation
        for u in units:
            fk = forward_key[id(u)]
            if fk not in weights:
                weights[fk] = _forward_weight(specs[id(u)], registry) if kind != "serial" else 0.0
            if n_users[fk] > 1 and fk not in fwd_tasks and not StageCache(cache_root, use_cache).has("forward", fk):
                fwd_tasks[fk] = ForwardTask(u.spec, str(cache_root), use_cache, track_memory)
                fwd_weights[fk] = weights[fk]
        unit_weights = [weights[forward_key[id(u)]] if n_users[forward_key[id(u)]] == 1 else 0.0 for u in units]
        fwd_errors: dict[str, str] = {}
        if fwd_tasks and kind != "serial":  # serially, phase 2 simulates on first use
            bar = _bar(len(fwd_tasks), 0, f"{spec.name}: simulate", progress)
            fwd_keys = list(fwd_tasks)
            for fk, err in ex.map_unordered(
                    run_forward_task, [fwd_tasks[k] for k in fwd_keys], weights=[fwd_weights[k] for k in fwd_keys],
                    on_lost=lambda lost: (stage_keys(ScenarioSpec.model_validate(lost.task.spec), registry, 0,
                                                     env).forward, _lost_message(lost))):
                if err:
                    fwd_errors[fk] = err
                bar.update(1)
            bar.close()
        for u in units:
            u.forward_error = fwd_errors.get(forward_key[id(u)])

        # phase 2: noise → reconstruct → score, one (point, repeat) at a time
        bar = _bar(scenario.n_units, n_done, f"{spec.name}: points", progress)
        last_table = time.monotonic()
        # serially no worker can be lost (and test doubles of the serial executor take no options)
        opts = {} if kind == "serial" else {
            "on_lost": lambda lost: run_unit(dataclasses.replace(lost.task, worker_error=_lost_message(lost)))}
        if any(unit_weights):  # units that simulate for themselves: the heaviest first
            opts["weights"] = unit_weights
        for res in ex.map_unordered(run_unit, units, **opts):
            if res.error:
                n_errors += 1
                bar.write(f"[tembench] point {res.point_index} repeat {res.repeat} failed: "
                          f"{res.error.splitlines()[0]}")
            hook.tembench_point_finished(point={**res.values, "point_index": res.point_index, "repeat": res.repeat},
                                         rows=res.rows, error=res.error)
            bar.update(1)
            aggregator.point_finished(res.point_index)
            if time.monotonic() - last_table > 5.0:
                store.write_tables(catalog)
                last_table = time.monotonic()
        bar.close()

    aggregator.finish()  # also points whose repeats all finished in an earlier session
    table = store.write_tables(catalog)
    if aggregator.enabled:
        manifest["n_aggregate_rows"] = int(len(store.write_aggregate_tables()))
    manifest["status"] = "complete"
    manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["n_rows"] = int(len(table))
    manifest["n_error_rows"] = int((table["status"] == "error").sum()) if "status" in table else 0
    store.write_manifest(manifest)
    if report:
        from tembench.report import render_report

        render_report(run_dir, registry=registry)
    return RunResult(run_dir, table, scenario.n_units, len(units), n_errors)


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="pt", disable=not enabled, mininterval=0.5,
                dynamic_ncols=True, file=sys.stderr)
