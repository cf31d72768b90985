"""Random stages are seeded by the scenario, not by the code: a change of code that leaves a stage's result
alone draws the same sample and the same noise (the cache keys still change, so nothing stale is reused)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tembench import runner as runner_mod
from tembench.scenario import parse_scenario

SCENARIO = """
name: seeds
seed: 11
repeats: 2
sample: dummy_dot
forward: {name: dummy_image, params: {n: 16}}
noise: [{name: dummy_noise, params: {sigma: 0.3}}]
reconstructors: [{name: dummy_identity}]
quantifiers: [dummy_mean]
sweep:
  grid:
    noise.0.sigma: [0.1, 0.3]
"""

RESULTS = ["mean", "sumsq", "final_cost"]


def _keys(sc, repeat=0):
    return runner_mod.stage_keys(sc.points[0].spec, runner_mod.get_registry(), repeat)


def test_seeds_ignore_code_fingerprints_but_cache_keys_do_not(registry, monkeypatch):
    sc = parse_scenario(SCENARIO)
    before = _keys(sc)
    monkeypatch.setattr(runner_mod, "component_fingerprint", lambda cls: "changed-code")
    after = _keys(sc)
    assert (after.sample, after.forward, after.noise) != (before.sample, before.forward, before.noise)
    assert after.sample_seed == before.sample_seed and after.noise_step_seeds == before.noise_step_seeds
    # the seeds still follow what the draws depend on: the repeat, the scenario seed, the parameters
    assert _keys(sc, repeat=1).noise_step_seeds != before.noise_step_seeds
    assert _keys(parse_scenario(SCENARIO.replace("seed: 11", "seed: 12"))).sample_seed != before.sample_seed
    assert _keys(sc).noise_step_seeds != runner_mod.stage_keys(sc.points[1].spec, registry, 0).noise_step_seeds


def test_the_same_table_after_a_code_change_that_does_not_touch_the_numbers(registry, tmp_path, monkeypatch):
    sc = parse_scenario(SCENARIO)
    ref = runner_mod.run_scenario(sc, out=tmp_path / "a", progress=False, report=False).table
    monkeypatch.setattr(runner_mod, "component_fingerprint", lambda cls: "changed-code")
    new = runner_mod.run_scenario(sc, out=tmp_path / "b", progress=False, report=False)
    assert new.n_computed == sc.n_units  # nothing came from the first run's cache (other keys)
    pd.testing.assert_frame_equal(new.table[RESULTS], ref[RESULTS])
    assert np.unique(ref["sumsq"]).size == len(ref)  # the draws differ between points and repeats
