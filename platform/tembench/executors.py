"""Executors run independent tasks of a sweep: ``serial``, ``processes`` (a local pool) and,
later, ``dask``. An executor only needs :meth:`map_unordered`; results arrive as tasks finish.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from tembench.errors import ScenarioError


class Executor:
    name = "base"

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialExecutor(Executor):
    """Runs tasks one after another in this process (plugins registered in code are visible)."""

    name = "serial"

    def map_unordered(self, fn, tasks):
        for task in tasks:
            yield fn(task)


class ProcessExecutor(Executor):
    """A local process pool. Workers start with ``forkserver`` (safe with threaded FFTs) and load
    plugins from entry points, so components registered only in code are not visible to them."""

    name = "processes"

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._pool

    def map_unordered(self, fn, tasks):
        pool = self._ensure()
        pending = set()
        task_iter = iter(tasks)
        # keep at most 2 tasks per worker in flight so an interrupt loses little work
        for task in task_iter:
            pending.add(pool.submit(fn, task))
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
                nxt = next(task_iter, None)
                if nxt is not None:
                    pending.add(pool.submit(fn, nxt))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def make_executor(kind: str, workers: int = 2, address: str | None = None) -> Executor:
    if kind == "serial":
        return SerialExecutor()
    if kind == "processes":
        return ProcessExecutor(workers)
    if kind == "dask":
        raise ScenarioError("executor 'dask' is not available yet in this version of tembench; use "
                            "`executor: {kind: processes, workers: N}` for a local pool")
    raise ScenarioError(f"unknown executor {kind!r}; choose serial or processes")
