"""Executors run independent tasks of a sweep: ``serial``, ``processes`` (a local pool) and ``dask``
(dask.distributed: a local cluster, an existing scheduler, or workers started through an HPC batch
system with dask-jobqueue). An executor only needs :meth:`Executor.map_unordered`; results arrive
as tasks finish.

Both parallel executors send tasks in **batches** whose size adapts to the measured run time of a
task, so the fixed cost of one submission (≈ 2 ms for the pool, 2-15 ms for dask) stays below
:data:`OVERHEAD_FRACTION` of the work it carries, while keeping at least two batches per worker in
flight for load balance. Tasks may carry a weight: heavier tasks are sent first.

Worker loss (a killed or crashed dask worker) is handled by the dask scheduler, which runs the
lost tasks again on another worker, up to ``distributed.scheduler.allowed-failures`` times; a task
that kills its worker more often than that becomes a :class:`TaskLost` passed to ``on_lost``. A
task's own exception is never retried (the runner turns a unit's error into error rows itself).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from tembench.errors import ScenarioError

OVERHEAD_FRACTION = 0.05  # per-task overhead / task time the batching aims below
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # dask's nanny sets them to 1

CLUSTER_KINDS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}
ADDRESS_RE = re.compile(r"^(tcp|tls|ucx|ws|wss)://[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def noop_task(x: Any = None) -> Any:
    """A task that does nothing (used to measure the per-task overhead of an executor)."""
    return x


def run_batch(fn: Callable[[Any], Any], batch: list[Any]) -> list[tuple[Any, float]]:
    """Run ``fn`` on each task of a batch in a worker; return (result, seconds) per task."""
    out = []
    for task in batch:
        t0 = time.perf_counter()
        res = fn(task)
        out.append((res, time.perf_counter() - t0))
    return out


class TaskLost(Exception):
    """A task whose worker died more often than the scheduler allows (dask ``KilledWorker``)."""

    def __init__(self, task: Any, cause: BaseException) -> None:
        super().__init__(f"the worker running this task died repeatedly ({type(cause).__name__}: {cause})")
        self.task, self.cause = task, cause


class Executor:
    name = "base"
    task_overhead_s = 0.0  # prior for the fixed cost of one submission (measured: benchmarks/test_executors.py)
    dashboard_link: str | None = None

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any], *, weights: list[float] | None = None,
                      on_lost: Callable[[TaskLost], Any] | None = None) -> Iterator[Any]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ordered(tasks: Iterable[Any], weights: list[float] | None) -> list[Any]:
    tasks = list(tasks)
    if weights is None:
        return tasks
    if len(weights) != len(tasks):
        raise ValueError("one weight per task")
    order = sorted(range(len(tasks)), key=lambda i: -float(weights[i]))  # stable: ties keep their order
    return [tasks[i] for i in order]


class SerialExecutor(Executor):
    """Runs tasks one after another in this process (plugins registered in code are visible)."""

    name = "serial"

    def map_unordered(self, fn, tasks, *, weights=None, on_lost=None):
        for task in _ordered(tasks, weights):
            yield fn(task)


class _Batching(Executor):
    """Adaptive batching over a ``submit(batch) → future`` / ``wait_any(futures)`` pair."""

    max_in_flight_per_worker = 2

    def _n_slots(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def _submit(self, fn, batch: list[Any], priority: int):  # pragma: no cover
        raise NotImplementedError

    def _wait_any(self, pending: set) -> tuple[set, set]:  # pragma: no cover
        raise NotImplementedError

    def _lost(self, exc: BaseException) -> bool:
        return False

    def batch_size(self, remaining: int, unit_s: float | None) -> int:
        """Tasks per submission: enough that the overhead is < OVERHEAD_FRACTION of the batch's run time,
        but at most a fair share so every worker keeps ≥ 2 batches to balance the load."""
        if unit_s is None or remaining <= 0:
            return 1
        need = math.ceil(self.task_overhead_s / (OVERHEAD_FRACTION * max(unit_s, 1e-6)))
        fair = max(1, remaining // (self.max_in_flight_per_worker * self._n_slots()))
        return int(max(1, min(need, fair)))

    def map_unordered(self, fn, tasks, *, weights=None, on_lost=None):
        queue = deque(_ordered(tasks, weights))
        pending: dict[Any, list[Any]] = {}
        times: list[float] = []
        priority = len(queue)

        def fill() -> None:
            nonlocal priority
            while queue and len(pending) < self.max_in_flight_per_worker * self._n_slots():
                unit_s = sorted(times)[len(times) // 2] if times else None
                n = self.batch_size(len(queue), unit_s)
                batch = [queue.popleft() for _ in range(min(n, len(queue)))]
                pending[self._submit(fn, batch, priority)] = batch
                priority -= 1  # earlier (heavier) batches first

        fill()
        while pending:
            done, _ = self._wait_any(set(pending))
            for fut in done:
                batch = pending.pop(fut)
                try:
                    results = fut.result()
                except BaseException as exc:
                    if on_lost is None or not self._lost(exc):
                        raise
                    for task in batch:
                        yield on_lost(TaskLost(task, exc))
                    continue
                for res, dt in results:
                    times.append(dt)
                    yield res
            fill()


class ProcessExecutor(_Batching):
    """A local process pool, kept for the whole run (imports, plugin discovery and FFT plans are paid
    once per worker, never per unit).

    Workers are forked from this process when that is safe — no thread pool of numba, JAX or Python
    running yet, as in a fresh ``tembench run`` — so they start at once with everything this process
    imported (and its registry, plugins registered in code included). Otherwise they start from a
    ``forkserver`` that imports the core and the plugins, and load plugins from entry points (so
    components registered only in code are not visible to them)."""

    name = "processes"
    task_overhead_s = 0.002

    def __init__(self, workers: int = 2, start_method: str = "auto") -> None:
        self.workers = workers
        self.start_method = start_method
        self._pool: ProcessPoolExecutor | None = None
        self._warm: tuple[str, ...] = ()

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            method = self.start_method
            if method == "auto":
                method = "fork" if fork_is_safe() else "forkserver"
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                # the forkserver imports the core and the plugins once; every worker forks from it with
                # them already imported (only when the forkserver starts: it lives as long as this process)
                ctx.set_forkserver_preload(_preload_modules())
            self.method = method
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_warm_worker,
                                             initargs=(self._warm, method != "fork"))
        return self._pool

    def prestart(self, modules: Iterable[str] = ()) -> None:
        """Start the workers now, each importing ``modules`` (and what they defer, :func:`warm_imports`)
        as it starts, while this process goes on with the run's set-up (run identity, manifest).

        Measured on the two heavy Ren points of ``benchmarks/test_executors.py``: a worker otherwise
        imports ≈ 1 200 modules inside its first two tasks (numba, scipy parts, scikit-learn, ase), ≈ 1.5 s
        of CPU each, after the set-up instead of during it. Forking here is safe for the same reason as at
        the first task: nothing has computed in this process yet (:func:`fork_is_safe` decides)."""
        if self._pool is not None:
            return
        self._warm = tuple(modules)
        self._ensure().submit(noop_task)  # launches every worker (fork: all at once; else on demand)

    def _n_slots(self) -> int:
        return self.workers

    def _submit(self, fn, batch, priority):
        return self._ensure().submit(run_batch, fn, batch)

    def _wait_any(self, pending):
        return wait(pending, return_when=FIRST_COMPLETED)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


_computed_here = False


def note_computation() -> None:
    """Called by the runner when a stage computes in this process: from then on its numeric libraries
    may hold thread pools that do not survive a fork (OpenMP's, e.g. scikit-learn's k-means: a
    forked worker deadlocks in the OpenMP barrier), so later pools start from a forkserver."""
    global _computed_here
    _computed_here = True


def fork_is_safe() -> bool:
    """True when forking this process cannot inherit a held lock of a running thread pool: Linux, no
    stage computed here yet, one Python thread, numba's parallel threads not launched, no JAX backend
    initialised. (OpenBLAS and pocketfft pools re-initialise after a fork.)"""
    import threading

    if _computed_here:
        return False

    # tqdm's monitor thread only sleeps on an event (the workers never use tqdm)
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
    if not sys.platform.startswith("linux") or others:
        return False
    par = sys.modules.get("numba.np.ufunc.parallel")
    if par is not None and getattr(par, "_is_initialized", True):
        return False
    xb = sys.modules.get("jax._src.xla_bridge")
    if xb is not None and getattr(xb, "_backends", {1: 1}):
        return False
    return os.environ.get("TEMBENCH_POOL_START", "auto") in ("auto", "fork")


def _preload_modules() -> list[str]:
    """The runner and the plugin modules this process already imported without error."""
    mods = ["tembench.runner"]
    try:
        from importlib.metadata import entry_points

        mods += sorted({ep.module for ep in entry_points(group="tembench") if ep.module in sys.modules})
    except Exception:  # noqa: BLE001 - preloading is only a speed-up
        pass
    return mods


def _warm_worker(modules: tuple[str, ...] = (), registry: bool = True) -> None:
    """When a worker starts rather than inside its first task: load the plugins (not needed after a fork,
    which inherits the registry) and import ``modules`` with everything they defer."""
    try:
        if registry:
            from tembench.registry import get_registry

            get_registry()
        if modules:
            from tembench._lazy import warm_imports

            warm_imports(modules)
    except Exception:  # noqa: BLE001 - the first task reports the problem
        pass


class DaskExecutor(_Batching):
    """Runs tasks on a dask.distributed cluster.

    * no ``address`` and no ``cluster``: a :class:`distributed.LocalCluster` of ``workers`` worker
      processes (``threads_per_worker`` threads each, ``memory_limit`` per worker);
    * ``address: tcp://host:port``: an existing scheduler (its workers must see the same files);
    * ``cluster: {kind: slurm|pbs|sge, jobs: N, ...}``: workers started as batch jobs by
      dask-jobqueue; the other keys (cores, memory, queue, account, walltime, ...) go to the
      jobqueue cluster class.

    ``resources`` (e.g. ``{"gpu": 1}``) are requested by every task; the cluster must offer them
    (checked when connecting: dask would otherwise wait forever for a worker that has them).
    """

    name = "dask"
    task_overhead_s = 0.01  # measured 2 ms idle, 15 ms at load 10-14 on 2 cores (benchmarks/test_executors.py)
    max_in_flight_per_worker = 3  # hides the scheduler round trip

    def __init__(self, workers: int = 2, address: str | None = None, *, threads_per_worker: int = 1,
                 memory_limit: str | float | None = "auto", cluster: dict[str, Any] | None = None,
                 resources: dict[str, float] | None = None, wait_for_workers_s: float = 60.0,
                 allowed_failures: int = 3, device: str = "cpu") -> None:
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError:
            raise ScenarioError("executor 'dask' needs dask.distributed: pip install 'tembench[dask]'") from None
        self.resources = {k: float(v) for k, v in (resources or {}).items()}
        self._cluster = None
        # workers keep the client's thread settings (dask's nanny would set OMP/MKL/OPENBLAS_NUM_THREADS=1,
        # which changes BLAS rounding, the environment identity and so every stage key: not the serial table)
        self._config = dask.config.set({"distributed.scheduler.allowed-failures": int(allowed_failures),
                                        **{f"distributed.nanny.pre-spawn-environ.{k}": None for k in THREAD_VARS}})
        self._config.__enter__()
        try:
            if cluster is not None:
                self._cluster = make_jobqueue_cluster(cluster)
                check_job_script_resources(self._cluster.job_script(), self.resources)
                self._cluster.scale(jobs=int(cluster.get("jobs", 1)))
                self.client = Client(self._cluster)
            elif address is not None:
                try:
                    self.client = Client(address, timeout="20s")
                except (OSError, TimeoutError) as exc:
                    raise ScenarioError(f"executor: could not connect to the dask scheduler at {address!r}: "
                                        f"{type(exc).__name__}: {exc}. Is the scheduler running and reachable "
                                        "from here?") from None
            else:
                self._cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                             processes=True, memory_limit=memory_limit, dashboard_address=":0",
                                             silence_logs=40)
                self.client = Client(self._cluster)
            if self.resources or cluster is None:
                self.client.wait_for_workers(1, timeout=wait_for_workers_s)
            if self.resources:
                check_cluster_resources(self.client.scheduler_info(n_workers=-1), self.resources)
            if address is not None:
                warn_environment_differences(self.client, device)
            self.dashboard_link = self.client.dashboard_link
        except BaseException:
            self.close()
            raise

    def _n_slots(self) -> int:
        try:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            return max(1, sum(int(w.get("nthreads", 1)) for w in info.values()))
        except Exception:  # noqa: BLE001
            return 1

    def _submit(self, fn, batch, priority):
        # pure=False: a new key every time (a re-run is a new task, never a stale cached result);
        # retries=0: a task's own exception is not retried (worker loss is rescheduled by dask)
        return self.client.submit(run_batch, fn, batch, pure=False, retries=0, priority=priority,
                                  resources=self.resources or None)

    def _wait_any(self, pending):
        from distributed import wait as dwait

        return dwait(list(pending), return_when="FIRST_COMPLETED")

    def _lost(self, exc):
        from distributed.scheduler import KilledWorker

        return isinstance(exc, KilledWorker)

    def worker_pids(self) -> dict[str, int]:
        """The process id of every worker (for tests that kill one)."""
        return self.client.run(os.getpid)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            self.client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        if getattr(self, "_config", None) is not None:
            self._config.__exit__(None, None, None)
            self._config = None


def warn_environment_differences(client, device: str = "cpu") -> None:
    """Warn when the workers' numeric environment (libraries, FFT, BLAS threads) differs from this
    process's: their stage keys and so their results then differ from a local run's."""
    from tembench.identity import environment_identity

    try:
        mine = environment_identity(device)
        theirs = client.run(environment_identity, device)
    except Exception as exc:  # noqa: BLE001 - only a warning
        print(f"[tembench] could not compare the dask workers' environment with this one: {exc}", file=sys.stderr)
        return
    for worker, env in theirs.items():
        diff = sorted(k for k in set(mine) | set(env) if mine.get(k) != env.get(k))
        if diff:
            print(f"[tembench] warning: dask worker {worker} runs in another environment than this process "
                  f"(differs in: {', '.join(diff)}); its stage keys and results will differ from a local run's",
                  file=sys.stderr)


def make_jobqueue_cluster(cluster: dict[str, Any]):
    """A dask-jobqueue cluster from ``{kind: slurm|pbs|sge, jobs: N, **options}`` (not yet scaled)."""
    opts = dict(cluster)
    kind = opts.pop("kind", None)
    opts.pop("jobs", None)
    if kind not in CLUSTER_KINDS:
        raise ScenarioError(f"executor.cluster.kind: unknown batch system {kind!r}; choose one of "
                            f"{', '.join(CLUSTER_KINDS)}")
    try:
        import dask_jobqueue
    except ImportError:
        raise ScenarioError("executor.cluster needs dask-jobqueue: pip install 'tembench[dask]'") from None
    cls = getattr(dask_jobqueue, CLUSTER_KINDS[kind])
    opts.setdefault("cores", 1)
    opts.setdefault("memory", "4GB")
    opts.setdefault("processes", 1)
    try:
        return cls(**opts)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"executor.cluster ({kind}): {type(exc).__name__}: {exc}") from None


def _have(offered: dict[str, float], need: dict[str, float]) -> bool:
    return all(float(offered.get(k, 0)) >= v for k, v in need.items())


def check_cluster_resources(info: dict[str, Any], need: dict[str, float]) -> None:
    """Refuse resources that no worker of the cluster offers (dask would wait for them forever)."""
    workers = info.get("workers", {})
    if any(_have(w.get("resources") or {}, need) for w in workers.values()):
        return
    offered = sorted({f"{k}={v:g}" for w in workers.values() for k, v in (w.get("resources") or {}).items()})
    want = ", ".join(f"{k}={v:g}" for k, v in need.items())
    raise ScenarioError(
        f"executor: the tasks need the resources {want} but none of the {len(workers)} dask workers offers them "
        f"(workers offer: {', '.join(offered) or 'no resources'}). Start workers with "
        f"`dask worker ... --resources \"{want.replace(', ', ',')}\"` (or add "
        f"`worker_extra_args: [--resources, {want.replace(', ', ',')}]` to executor.cluster), or use device: cpu. "
        "Nothing was run.")


def check_job_script_resources(script: str, need: dict[str, float]) -> None:
    """The batch job script must start workers offering the resources the tasks need."""
    if not need:
        return
    m = re.search(r"--resources[ =]+[\"']?([^\s\"']+)", script)
    offered: dict[str, float] = {}
    if m:
        for part in m.group(1).split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                try:
                    offered[k.strip()] = float(v)
                except ValueError:
                    pass
    check_cluster_resources({"workers": {"job": {"resources": offered}}}, need)


def check_address(address: str, where: str = "<scenario>") -> None:
    if not ADDRESS_RE.match(address):
        raise ScenarioError(f"{where}: executor.address: {address!r} is not a dask scheduler address; expected "
                            "e.g. tcp://10.0.0.5:8786 (protocol tcp, tls, ucx, ws or wss, host and port)")


def task_resources(options: Any = None, device: str = "cpu") -> dict[str, float]:
    """The dask resources every task requests: the scenario's ``executor.resources``, plus ``gpu: 1``
    for ``device: gpu`` unless a gpu amount is declared."""
    need = {k: float(v) for k, v in (getattr(options, "resources", None) or {}).items()}
    if device == "gpu":
        need.setdefault("gpu", 1.0)
    return need


def make_executor(kind: str, workers: int = 2, address: str | None = None, *, options: Any = None,
                  device: str = "cpu") -> Executor:
    """The executor ``kind``; ``options`` is the scenario's ``executor`` section (dask settings)."""
    if kind == "serial":
        return SerialExecutor()
    if kind == "processes":
        return ProcessExecutor(workers)
    if kind == "dask":
        o = options
        if address is not None:
            check_address(address)
        return DaskExecutor(
            workers, address,
            threads_per_worker=getattr(o, "threads_per_worker", 1) or 1,
            memory_limit=getattr(o, "memory_limit", "auto"),
            cluster=(o.cluster.model_dump() if getattr(o, "cluster", None) is not None else None),
            resources=task_resources(o, device), device=device)
    raise ScenarioError(f"unknown executor {kind!r}; choose serial, processes or dask")


def print_dashboard(ex: Executor, enabled: bool) -> None:
    if enabled and ex.dashboard_link:
        print(f"[tembench] dask dashboard: {ex.dashboard_link}", file=sys.stderr)
