"""Stage cache (tembench.cache): throughput against plain np.save/np.load, and RAM of a cached re-run at ~1 GiB.

Run: ``python -m pytest benchmarks/test_stage_cache.py -s``. Everything is measured in one run on
the same machine; files are in the page cache (just written), so the numbers are memory/CPU
bound, not disk bound.

* write: ``StageCache.put`` of a 4D float32 array (stream to .npy + blake2b, or size + sampled
  blocks above 256 MiB, + JSON) vs ``np.save`` of the same array.
* read: ``StageCache.get`` (verify checksums, then memory-map copy-on-write) vs ``np.load``
  (reads the whole array into RAM); and both followed by one full pass over the data (a sum),
  which is what a consumer pays in the end. The cache's per-process verification memo is
  cleared before every get, so each get is a first hit.
* RAM: peak RSS growth (``ru_maxrss``) of a subprocess re-running a ~1 GiB stem4d scenario from
  the cache, and of one that computes a new virtual-detector image from the cached data (reads
  every byte through the mapping: those pages count in RSS as file-backed page cache; anonymous
  memory is sampled from /proc/self/status).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tembench import cache as cache_mod
from tembench.cache import StageCache

MiB = 2**20


def _sum(a) -> float:
    return float(np.add.reduce(np.asarray(a).reshape(-1), dtype=np.float64))


@pytest.mark.parametrize("size_mib", [128, 512])
def test_cache_write_read_throughput(benchmark, tmp_path, size_mib):
    n_k = 128
    n_scan = int(round((size_mib * MiB / (n_k * n_k * 4)) ** 0.5))
    arr = np.random.default_rng(0).random((n_scan, n_scan, n_k, n_k), dtype=np.float32)
    mb = arr.nbytes / 1e6
    npy = tmp_path / "plain.npy"
    cache = StageCache(tmp_path / "cache")
    rounds = 3
    best = {k: float("inf") for k in ("np.save", "cache.put", "np.load", "cache.get", "np.load+sum", "cache.get+sum")}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        best[name] = min(best[name], time.perf_counter() - t)
        return out

    def one_round(i):
        npy.unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        timed("np.save", lambda: np.save(npy, arr))
        assert timed("cache.put", lambda: cache.put("forward", f"k{i}", {"value": arr}))
        timed("np.load", lambda: np.load(npy))
        cache_mod._verified.clear()
        timed("cache.get", lambda: cache.get("forward", f"k{i}"))
        timed("np.load+sum", lambda: _sum(np.load(npy)))
        cache_mod._verified.clear()
        timed("cache.get+sum", lambda: _sum(cache.get("forward", f"k{i}")["value"]))

    benchmark.pedantic(one_round, args=(0,), rounds=1, iterations=1)
    for i in range(1, rounds):
        one_round(i)
    rates = {k: mb / v for k, v in best.items()}
    benchmark.extra_info.update({f"{k}_MB_per_s": round(v) for k, v in rates.items()})
    benchmark.extra_info["array_MB"] = round(mb)
    benchmark.extra_info["write_ratio_cache_over_np_save"] = best["np.save"] / best["cache.put"]
    benchmark.extra_info["read_plus_sum_ratio_cache_over_np_load"] = best["np.load+sum"] / best["cache.get+sum"]
    print(f"\n{arr.shape} float32, {mb:.0f} MB (best of {rounds}, page cache hot):")
    for k in best:
        print(f"  {k:<14} {best[k]:7.3f} s  {rates[k]:8.0f} MB/s")
    print(f"  write: cache.put / np.save throughput = {best['np.save'] / best['cache.put']:.2f}; "
          f"read + one pass: cache.get / np.load = {best['np.load+sum'] / best['cache.get+sum']:.2f}")


RSS_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, threading, time
    import pyarrow, pandas  # imported lazily by the runner's table writer; not what is measured
    from tembench.registry import get_registry
    from tembench.runner import run_scenario
    from tembench.scenario import parse_scenario

    def rss_anon_kib():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    peak_anon = [0]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], rss_anon_kib())
            time.sleep(0.005)

    get_registry()
    sc = parse_scenario(open(sys.argv[1]).read())
    base_anon = rss_anon_kib()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    th = threading.Thread(target=sample, daemon=True); th.start()
    t0 = time.perf_counter()
    res = run_scenario(sc, out=sys.argv[2], run_id=sys.argv[3], progress=False, report=False)
    dt = time.perf_counter() - t0
    stop.set(); th.join()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = res.table
    print(json.dumps({"growth_MiB": (after - before) / 1024, "anon_growth_MiB": (peak_anon[0] - base_anon) / 1024,
                      "s": dt, "hits": t["recon_cache_hit"].tolist(), "ok": bool((t["status"] == "ok").all())}))
""")

SCENARIO = """
name: cache_rss_1g
seed: 1
repeats: 1
sample: {{name: twisted_bilayer, params: {{material: MoS2, n_layers: 1, repeat: [5, 3], rms_displacement_A: null}}}}
forward:
  name: stem4d
  params: {{energy_keV: 80, sampling_A: 0.1, semiangle_mrad: 25, scan_step_A: 0.063, window_gpts: 64,
           slice_thickness_A: 6.6, detectors: {{adf: [40, null]}}, patterns_path: {path}}}
reconstructors: [{recons}]
quantifiers: [image_statistics]
"""
BF = "{name: virtual_detector, label: vbf, params: {detector: bf}}"
ADF = "{name: virtual_detector, label: vadf, params: {detector: adf}}"


def test_cached_rerun_peak_rss_at_1GiB(benchmark, tmp_path):
    patterns = tmp_path / "patterns.npy"
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    out = tmp_path / "out"

    def run(recons, run_id):
        sc = tmp_path / f"{run_id}.yaml"
        sc.write_text(SCENARIO.format(path=patterns, recons=recons))
        p = subprocess.run([sys.executable, str(script), str(sc), str(out), run_id], capture_output=True, text=True,
                           timeout=1800)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    fresh = run(BF, "run-fresh")
    data_mib = patterns.stat().st_size / MiB
    cached = benchmark.pedantic(run, args=(BF, "run-cached"), rounds=1, iterations=1)
    new_recon = run(f"{BF}, {ADF}", "run-new-recon")
    assert fresh["ok"] and cached["ok"] and cached["hits"] == [True] and sorted(new_recon["hits"]) == [False, True]
    info = {"data_MiB": data_mib, "fresh": fresh, "cached": cached, "cached_plus_new_reconstruction": new_recon,
            "cached_growth_fraction_of_data": cached["growth_MiB"] / data_mib}
    benchmark.extra_info.update(info)
    print(f"\nstem4d patterns streamed to disk: {data_mib:.0f} MiB")
    for name, r in (("fresh run (simulate, link into cache)", fresh), ("re-run, every stage from cache", cached),
                    ("re-run + a new virtual_detector on the cached data", new_recon)):
        print(f"  {name:<52} peak RSS +{r['growth_MiB']:6.0f} MiB ({r['growth_MiB'] / data_mib:5.1%} of the data), "
              f"anonymous +{r['anon_growth_MiB']:6.0f} MiB, {r['s']:.1f} s")
    assert cached["growth_MiB"] < 0.25 * data_mib
