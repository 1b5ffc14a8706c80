"""Where sweep tasks run: this process, local worker processes, or a Dask cluster.

Every executor is a generator of (task, result) pairs in completion order, so
the caller can save each result the moment it exists. Task functions catch
their own errors and return them as data; an executor only has to survive a
worker that dies.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Optional, Sequence

from sim.config.loader import ConfigError

Pair = tuple[Any, Any]


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, executor: str = "local",
              workers: Optional[int] = None, scheduler: Optional[str] = None,
              on_crash: Callable[[Any, BaseException], Any]) -> Iterator[Pair]:
    """Yield (task, fn(task)) as tasks finish; a task whose worker crashed yields on_crash(task, error)."""
    if not tasks:
        return iter(())
    if executor == "dask":
        return _dask(fn, tasks, scheduler, workers)
    if executor != "local":
        raise ConfigError([f"--executor: unknown executor {executor!r} (known: local, dask)"])
    workers = min(workers or default_workers(), len(tasks))
    if workers == 1:
        return ((task, fn(task)) for task in tasks)
    return _processes(fn, tasks, workers, on_crash)


def _processes(fn, tasks, workers, on_crash) -> Iterator[Pair]:
    context = _context()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        pending = {pool.submit(fn, task): task for task in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                error = future.exception()
                yield task, (on_crash(task, error) if error is not None else future.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one: workers start from a server that has already imported
    the simulator (a second, not seconds, per worker) and, unlike fork, inherit no threads or
    locks of the parent; spawn elsewhere."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["sim.experiments.sweep"])
        return context
    return multiprocessing.get_context("spawn")


def _dask(fn, tasks, scheduler: Optional[str], workers: Optional[int]) -> Iterator[Pair]:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError(["--executor dask: dask.distributed is not installed (pip install 'llmsim[dask]')"]) from None
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                               dashboard_address=None)
    client = Client(scheduler or cluster)
    try:
        futures = {client.submit(fn, task, pure=False): task for task in tasks}
        for future in as_completed(list(futures)):
            yield futures[future], future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
