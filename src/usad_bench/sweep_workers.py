"""`sweep --workers N`: N grid points at once on one machine, the CPU threads split between them.

Small runs do not keep many threads busy (two one-thread processes gave 1.16x the throughput of one
two-thread process on a 2-core CPU), so a sweep can run its points in N worker processes of a
standard ``ProcessPoolExecutor`` (spawned, not forked: torch's thread pools do not survive a fork),
each with ``threads // N`` torch threads. Every worker runs ``sweep.process_point``, exactly what the
sequential sweep and the submitit launcher run, so the same checks, locks and failure records apply.
Workers share the feature cache: each entry is written to its own temporary file and renamed into
place, so two workers computing the same entry leave one whole entry (both are identical).

SIGINT/SIGTERM: the parent stops handing out points, passes the signal on to the workers (each
raises ``Stopped`` and cleans up, as a sequential sweep does), waits for them, and reports what is done.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from usad_bench.errors import Stopped, UsadError


def threads_per_worker(workers: int, total: int | None = None) -> int:
    """The torch threads of each worker: this process's threads (or ``total``) split evenly, at least one."""
    import torch

    if workers < 1:
        raise UsadError(f"--workers must be at least 1, got {workers}")
    return max(1, (total or torch.get_num_threads()) // workers)


def run_points_in_workers(exp, points: list, device: str, cache_dir: Path | None, wandb, workers: int) -> None:
    """Every point of ``points`` in ``workers`` processes; the first failure stops handing out new points."""
    threads = threads_per_worker(workers)
    print(f"{workers} workers, {threads} torch thread(s) each", flush=True)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads, os.getcwd()))
    futures = []
    try:
        for n, point in enumerate(points, 1):
            prefix = f"[{n}/{len(points)}] "
            futures.append(pool.submit(_process_point, exp, point, device, cache_dir, wandb, prefix))
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        wait(futures)  # the points already running finish (or fail) in their own time
    except Stopped as stop:
        _stop_workers(pool, futures, stop.signum)
        stop.done = (
            f"{sum(_succeeded(f) for f in futures)} of the {len(points)} runs of this shard are finished and kept "
            "(runs in progress are not: their folders are as they were)"
        )
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    failures = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    if failures:
        raise failures[0]


def _succeeded(future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _stop_workers(pool: ProcessPoolExecutor, futures: list, signum: int) -> None:
    """Cancel what has not started and pass the signal on, so each worker raises ``Stopped`` and cleans up."""
    for future in futures:
        future.cancel()
    # The executor has no public handle on its processes; a terminal's Ctrl-C reaches them anyway, a
    # scheduler's SIGTERM to this process alone does not.
    for process in list(getattr(pool, "_processes", {}).values()):
        if process.is_alive():
            os.kill(process.pid, signum)
    wait(futures)


def _start_worker(threads: int, workdir: str) -> None:
    import torch

    os.chdir(workdir)  # grid files name data relative to where the sweep was started
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    def stop(signum, frame):
        raise Stopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def _process_point(exp, point, device: str, cache_dir, wandb, prefix: str) -> str:
    from usad_bench.sweep import process_point

    process_point(exp, point, device, cache_dir, wandb=wandb, prefix=prefix)
    return str(point.run_dir)
