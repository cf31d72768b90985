"""The dask.distributed executor (issue 13): same table as serial, and no row lost, duplicated or
recomputed when a worker or the client dies.

One 2-worker LocalCluster (``module`` scope) serves the fault tests through ``executor.address``;
its workers get the test plugin (``dummy_plugin``) through a dask WorkerPlugin, so a worker the
nanny restarts after a kill has it too. The bitwise test starts its own LocalCluster (no address)
on built-in components.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

import dummy_plugin  # noqa: E402
from test_determinism import _assert_bitwise_equal  # noqa: E402
from tembench import identity  # noqa: E402
from tembench.errors import ScenarioError  # noqa: E402
from tembench.executors import check_job_script_resources, make_executor, make_jobqueue_cluster  # noqa: E402
from tembench.runner import run_scenario  # noqa: E402
from tembench.scenario import ExecutorSpec, parse_scenario  # noqa: E402

HERE = Path(__file__).parent

SLOW = dummy_plugin.SCENARIO.replace(
    "  - {name: dummy_identity, label: a}\n  - {name: dummy_identity, label: b}\n",
    "  - {name: dummy_identity, label: a, params: {sleep_s: 0.6}}\n",
).replace("[0.0, 0.1, 0.2]", "[0.0, 0.1, 0.2, 0.3]")  # 4 points × 2 repeats = 8 units of ≈ 0.6 s, 8 rows


class DummyPluginOnWorkers(WorkerPlugin):
    """Registers the test plugin in every worker's default registry (also in workers started later)."""

    def setup(self, worker):
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        import dummy_plugin as dp
        from tembench.registry import get_registry

        reg = get_registry()
        if "dummy_identity" not in reg.components("reconstructor"):
            reg.register(dp, name="dummy_plugin")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log = tmp_path_factory.mktemp("calls") / "calls.log"
    old = os.environ.get("TEMBENCH_TEST_CALL_LOG")
    os.environ["TEMBENCH_TEST_CALL_LOG"] = str(log)  # inherited by the worker processes
    # a LocalCluster started the way `executor: {kind: dask, workers: 2, memory_limit: 2GB}` starts it
    ex = make_executor("dask", 2, options=ExecutorSpec(kind="dask", workers=2, memory_limit="2GB"))
    try:
        ex.client.register_plugin(DummyPluginOnWorkers())
        yield ex, log
    finally:
        ex.close()
        if old is None:
            os.environ.pop("TEMBENCH_TEST_CALL_LOG", None)
        else:
            os.environ["TEMBENCH_TEST_CALL_LOG"] = old


def _on(address: str, text: str = SLOW) -> str:
    return text + f"executor: {{kind: dask, address: '{address}'}}\n"


def _rows(run_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "rows").glob("*.json")}


def _check_complete(run_dir: Path, n: int) -> pd.DataFrame:
    table = pd.read_parquet(run_dir / "results.parquet")
    assert len(table) == n
    assert not table.duplicated(["point_index", "repeat", "reconstructor"]).any()
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert not list((run_dir / "rows").glob(".*.tmp")), "temporary row files left behind"
    return table


def _source_stamp() -> dict[str, int]:
    import tembench

    roots = [Path(tembench.__file__).parent, Path(tembench.__file__).parents[2] / "plugins"]
    return {str(f): f.stat().st_mtime_ns for r in roots if r.exists() for f in r.rglob("*.py")}


def test_local_cluster_reproduces_serial_table_bitwise(cluster, tmp_path):
    """A run on the LocalCluster: every non-timing column and every stored preview bit for bit."""
    pytest.importorskip("tembench.physics.potentials")
    text = textwrap.dedent("""
        name: dask_pool
        seed: 3
        repeats: 2
        sample: {name: crystal, params: {material: Si, repeat: [1, 1, 1]}}
        forward: {name: phase_object, params: {sampling_A: 0.25, defocus_A: 100}}
        noise: [{name: poisson_dose, params: {dose_e_per_A2: 1000}}]
        reconstructors: [weak_phase_wiener]
        quantifiers: [cross_correlation]
        sweep: {grid: {forward.defocus_A: [80, 120]}}
    """)
    from tembench.registry import Registry, set_registry

    set_registry(Registry(load_entry_points=False))
    try:
        for attempt in range(3):
            # stage keys hash the source of every component: a source file edited between the serial
            # run and the workers' imports (several people share a working tree) changes every key
            stamp = _source_stamp()
            identity.clear_caches()  # fingerprints from now, here and on the workers
            cluster[0].client.run(identity.clear_caches)
            sc = parse_scenario(text)
            a = run_scenario(sc, out=tmp_path / f"serial{attempt}", run_id="r", progress=False, report=False)
            b = run_scenario(parse_scenario(_on(cluster[0].client.scheduler.address, text)),
                             out=tmp_path / f"dask{attempt}", run_id="r", progress=False, report=False)
            if _source_stamp() == stamp:
                break
    finally:
        set_registry(None)
    assert b.n_computed == 4 and len(b.table) == 4
    _assert_bitwise_equal(a.run_dir, b.run_dir, "dask LocalCluster vs serial")
    manifest = (b.run_dir / "manifest.json").read_text()
    assert '"executor": "dask"' in manifest


def _kill_when(rows_dir_glob: Path, n_rows: int, kill, timeout_s: float = 120.0) -> dict:
    """Background thread: once ≥ n_rows rows exist, snapshot them and call kill()."""
    state: dict = {}

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dirs = list(rows_dir_glob.parent.glob(rows_dir_glob.name))
            if dirs and len(list(dirs[0].glob("*.json"))) >= n_rows:
                state["before"] = _rows(dirs[0].parent)
                kill()
                state["killed"] = True
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    state["thread"] = t
    return state


def test_worker_killed_mid_sweep_loses_and_duplicates_nothing(registry, cluster, tmp_path):
    ex, log = cluster
    pids = sorted(ex.worker_pids().values())
    n_before = log.read_text().count("reconstruct") if log.exists() else 0
    out = tmp_path / "out"
    state = _kill_when(out / "killrun" / "rows", 2, lambda: os.kill(pids[0], signal.SIGKILL))
    res = run_scenario(parse_scenario(_on(ex.client.scheduler.address)), out=out, run_id="killrun", progress=False,
                       report=False)
    state["thread"].join(5)
    assert state.get("killed"), "the worker was never killed"
    before = state["before"]
    assert 2 <= len(before) < 8, "the kill did not land mid-sweep"
    _check_complete(res.run_dir, 8)
    after = _rows(res.run_dir)
    # finished rows are neither rewritten nor replaced (same inode, time and bytes)
    assert {k: after[k] for k in before} == before
    # the killed worker's unit ran again (at most one per killed worker was mid-reconstruction), no other
    n_recon = log.read_text().count("reconstruct") - n_before
    assert 8 <= n_recon <= 8 + 2, n_recon
    assert pids[0] not in ex.worker_pids().values()  # the nanny replaced the killed process


CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import dummy_plugin
    from tembench.registry import Registry, set_registry
    from tembench.runner import run_scenario
    from tembench.scenario import parse_scenario
    if __name__ == "__main__":
        reg = Registry(load_entry_points=False)
        reg.register(dummy_plugin, name="dummy_plugin")
        set_registry(reg)
        run_scenario(parse_scenario({text!r}), out={out!r}, run_id="clientrun", progress=False, report=False)
""")


def test_killed_client_run_resumes(registry, cluster, tmp_path):
    ex, log = cluster
    out = tmp_path / "out"
    text = _on(ex.client.scheduler.address)
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT.format(here=str(HERE), text=text, out=str(out)))
    n_before = log.read_text().count("reconstruct") if log.exists() else 0
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        state = _kill_when(out / "clientrun" / "rows", 2, proc.kill)
        state["thread"].join(150)
        assert state.get("killed"), "the client never got to its second row"
        proc.wait(timeout=30)
    finally:
        proc.kill()
    before = state["before"]
    assert 2 <= len(before) < 8
    res = run_scenario(parse_scenario(text), out=out, run_id="clientrun", progress=False, report=False)
    _check_complete(res.run_dir, 8)
    after = _rows(res.run_dir)
    assert {k: after[k] for k in before} == before
    assert res.n_computed <= 8 - len(before)
    # tasks of the killed client still running on a worker may finish; nothing finished is recomputed
    n_recon = log.read_text().count("reconstruct") - n_before
    assert 8 <= n_recon <= 8 + 2, n_recon


def test_resources_the_cluster_lacks_are_refused_before_anything_is_written(registry, cluster, tmp_path):
    ex, _ = cluster
    text = _on(ex.client.scheduler.address, dummy_plugin.SCENARIO).replace(
        "executor: {kind: dask,", "executor: {kind: dask, resources: {gpu: 1},")
    out = tmp_path / "out"
    with pytest.raises(ScenarioError, match=r"need the resources gpu=1 but none of the 2 dask workers offers them"):
        run_scenario(parse_scenario(text), out=out, progress=False, report=False)
    assert not out.exists()


def test_gpu_device_on_a_cpu_cluster_is_refused(registry, cluster, tmp_path):
    ex, _ = cluster
    text = _on(ex.client.scheduler.address, dummy_plugin.SCENARIO).replace("seed: 7", "seed: 7\ndevice: gpu")
    out = tmp_path / "out"
    with pytest.raises(ScenarioError, match=r"gpu=1 but none of the 2 dask workers"):
        run_scenario(parse_scenario(text, check_resources=False), out=out, progress=False, report=False)
    assert not out.exists()


def test_slurm_job_script_starts_a_worker_with_the_declared_resources():
    cluster = make_jobqueue_cluster({"kind": "slurm", "jobs": 2, "cores": 4, "memory": "16GB", "queue": "gpu",
                                     "walltime": "02:00:00", "worker_extra_args": ["--resources", "gpu=1"],
                                     "job_extra_directives": ["--gres=gpu:1"]})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "#SBATCH -t 02:00:00" in script and "#SBATCH --gres=gpu:1" in script
    assert "-m distributed.cli.dask_worker tcp://" in script
    assert "--nthreads 4" in script and "--resources gpu=1" in script
    check_job_script_resources(script, {"gpu": 1.0})
    with pytest.raises(ScenarioError, match="gpu=2"):
        check_job_script_resources(script, {"gpu": 2.0})
    with pytest.raises(ScenarioError, match="unknown batch system 'lsf'"):
        make_jobqueue_cluster({"kind": "lsf"})


def test_batches_keep_overhead_small_but_every_worker_busy():
    from tembench.executors import ProcessExecutor

    ex = ProcessExecutor(2)  # never started: batch_size is arithmetic
    assert ex.batch_size(100, None) == 1  # nothing measured yet
    assert ex.batch_size(100, 1.0) == 1  # a 1 s unit: one per task
    # a 1 ms unit: 40 units per task keep a 2 ms overhead at 5 %, the fair share of 100 / (2 × 2) is 25
    assert ex.batch_size(100, 0.001) == 25
    assert ex.batch_size(10_000, 0.001) == 40
    assert np.isclose(ex.task_overhead_s / (40 * 0.001), 0.05)


def test_write_row_first_writer_wins(tmp_path):
    from tembench.store import RunStore

    store = RunStore(tmp_path / "run")
    assert store.write_row("p00000-a-r000-x", {"v": 1}) is True
    path = store.row_path("p00000-a-r000-x")
    stat = path.stat()
    assert store.write_row("p00000-a-r000-x", {"v": 2}) is False  # a re-run task: the finished row stays
    assert store.read_row("p00000-a-r000-x") == {"v": 1}
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_task_whose_workers_keep_dying_becomes_a_lost_task_the_others_go_on():
    """dask reschedules a task after a worker loss up to allowed-failures times, then raises
    KilledWorker: the executor hands that task to on_lost (the runner writes error rows) and goes on."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from distributed.scheduler import KilledWorker

    from tembench.executors import DaskExecutor, TaskLost, _Batching

    class Fake(_Batching):
        task_overhead_s = 0.0

        def _n_slots(self):
            return 2

        def _submit(self, fn, batch, priority):
            fut = Future()
            if "boom" in batch:
                fut.set_exception(KilledWorker("run_batch-1", SimpleNamespace(address="tcp://10.0.0.1:1234"), 3))
            else:
                fut.set_result([(fn(t), 0.0) for t in batch])
            return fut

        def _wait_any(self, pending):
            return set(pending), set()

        _lost = DaskExecutor._lost

    got = list(Fake().map_unordered(str.upper, ["a", "boom", "c"], on_lost=lambda lost: ("lost", lost.task)))
    assert sorted(map(str, got)) == sorted(["A", "C", "('lost', 'boom')"])
    with pytest.raises(KilledWorker):  # without on_lost the loss is not hidden
        list(Fake().map_unordered(str.upper, ["boom"]))
    assert issubclass(TaskLost, Exception)


def test_heavier_tasks_are_sent_first():
    from tembench.executors import SerialExecutor

    out = list(SerialExecutor().map_unordered(lambda x: x, ["light", "heavy", "mid"], weights=[1, 10, 5]))
    assert out == ["heavy", "mid", "light"]
