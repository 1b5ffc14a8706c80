"""Where sweep tasks run: this process, local worker processes, or a Dask cluster.

Every executor is a generator of (task, result) pairs in completion order, so
the caller can save each result the moment it exists. Task functions catch
their own errors and return them as data; an executor only has to survive a
worker that dies. Tasks are drawn from their iterable only as workers free up,
and local workers never outlive the sweep: they exit when it stops, whether it
finishes, is interrupted or is killed.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import re
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Iterator, Optional

from sim.config.loader import ConfigError

Pair = tuple[Any, Any]
IN_FLIGHT_PER_WORKER = 2  # one running and one waiting per worker: no worker idles, few tasks are held
EXIT_PARENT_GONE = 70     # a worker's exit status when its sweep went away (EX_SOFTWARE)
_END = object()


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_tasks(fn: Callable[[Any], Any], tasks: Iterable[Any], *, total: Optional[int] = None,
              executor: str = "local", workers: Optional[int] = None, scheduler: Optional[str] = None,
              on_crash: Callable[[Any, BaseException], Any]) -> Iterator[Pair]:
    """Yield (task, fn(task)) as tasks finish; a task whose worker crashed yields on_crash(task, error).

    `tasks` may be a generator (then `total` is its length): it is drawn as workers free up.
    Closing the returned generator before its end (an exception, Ctrl-C) stops the workers.
    """
    total = len(tasks) if total is None else total  # type: ignore[arg-type]
    if total == 0:
        return
    if executor == "dask":
        yield from _dask(fn, tasks, scheduler, workers)
        return
    if executor != "local":
        raise ConfigError([f"--executor: unknown executor {executor!r} (known: local, dask)"])
    workers = min(workers or default_workers(), total)
    if workers == 1:
        for task in tasks:
            yield task, fn(task)
        return
    yield from _processes(fn, tasks, workers, on_crash)


def _processes(fn, tasks: Iterable[Any], workers: int, on_crash) -> Iterator[Pair]:
    """A local process pool, `IN_FLIGHT_PER_WORKER` tasks a worker at a time."""
    context = _context()
    # Each worker watches the read end of this pipe; the write end never leaves this process, so
    # it closes when this process ends, however it ends (see _exit_with_parent).
    parent_alive, keep_alive = context.Pipe(duplex=False)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_start,
                               initargs=(parent_alive,))
    source = iter(tasks)
    pending: dict[Any, Any] = {}
    finished = False
    try:
        while True:
            while len(pending) < workers * IN_FLIGHT_PER_WORKER:
                task = next(source, _END)
                if task is _END:
                    break
                try:
                    pending[pool.submit(fn, task)] = task
                except BrokenProcessPool as error:  # a worker died and took the pool with it
                    yield task, on_crash(task, error)
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                error = future.exception()
                yield task, (on_crash(task, error) if error is not None else future.result())
        finished = True
    finally:
        if not finished:  # interrupted: the workers stop now rather than after their current points
            keep_alive.close()
        # wait=True: shutdown(wait=False) leaves the pool's thread running into interpreter exit,
        # where it races the exit hook over a closed pipe ("Exception ignored ... handle is closed").
        pool.shutdown(wait=True, cancel_futures=True)
        keep_alive.close()
        parent_alive.close()


def _worker_start(parent_alive: Connection) -> None:
    """In each worker: Ctrl-C is the parent's to handle, and the worker exits when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_alive,), name="llmsim-parent-watch",
                     daemon=True).start()


def _exit_with_parent(parent_alive: Connection) -> None:
    """Exit the worker when the parent's end of the pipe closes: it never writes, so a read returns only
    then, when the parent stops its workers or dies (SIGKILL included, which no handler sees). Without
    this a worker waits forever for tasks, and keeps the forkserver alive with it."""
    with contextlib.suppress(EOFError, OSError):
        parent_alive.recv_bytes()
    os._exit(EXIT_PARENT_GONE)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While a sweep runs, SIGTERM stops it as Ctrl-C does (KeyboardInterrupt): workers stopped, the
    folder's lock released, every finished point kept. Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        client = Client(cluster)
    else:
        client = _connect(Client, scheduler)
    try:
        window = IN_FLIGHT_PER_WORKER * max(sum(client.nthreads().values()), 1)
        yield from _dask_window(client, as_completed, fn, tasks, window)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


DASK_CONNECT_TIMEOUT_S = 10  # Dask's own default (30 s) is long to wait for a mistyped address


def _connect(client_class: Any, scheduler: str) -> Any:
    """A Dask client of the scheduler at `scheduler`; ConfigError in one line when there is none to talk to.

    Whatever answers at a wrong address decides how the client fails: a refused or
    silent port times out (OSError), a malformed address is a ValueError, and a
    server of another protocol (an HTTP proxy, say) sends bytes the client reads
    as a message length of exabytes (MemoryError). All of them are the address's fault.
    """
    try:
        return client_class(scheduler, timeout=DASK_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as err:
        why = re.sub(r"\s+", " ", str(err)).strip() or type(err).__name__
        raise ConfigError([f"--scheduler {scheduler}: cannot connect to a Dask scheduler: {why}"]) from None
    except MemoryError:
        raise ConfigError([f"--scheduler {scheduler}: something answers there, but not a Dask scheduler "
                           "(its reply made no sense as Dask's protocol)"]) from None


def _dask_window(client: Any, as_completed: Any, fn: Callable[[Any], Any], tasks: Iterable[Any],
                 window: int) -> Iterator[Pair]:
    """Keep `window` tasks submitted to the cluster, submitting the next as each finishes."""
    source = iter(tasks)
    futures = {client.submit(fn, task, pure=False): task for task in itertools.islice(source, window)}
    queue = as_completed(list(futures))
    for future in queue:
        task = futures.pop(future)
        following = next(source, _END)
        if following is not _END:
            submitted = client.submit(fn, following, pure=False)
            futures[submitted] = following
            queue.add(submitted)
        yield task, future.result()
