"""Coarse-grained CPU parallelism: independent chunks in worker threads that run torch ops single-threaded.

Why: the hot loops here (per-template statistics, per-template argmax) issue many medium-sized tensor ops.
With intra-op threading every op is an OpenMP parallel region whose threads meet at a barrier; on a CPU
shared with other busy processes a descheduled (or, with libgomp's default spin-wait, spinning) team member
stalls every op: 8 templates of a Cityscapes-size per-template evaluation took 45-82 s with 2 intra-op
threads next to two busy processes, 3.4 s in two single-threaded workers (same results). Independent chunks
in ``torch.get_num_threads()`` Python threads (torch releases the GIL inside ops), each with one intra-op
thread, never wait for each other, and use all cores on an idle machine.

``torch.set_num_threads(1)`` in a worker sets that thread's OpenMP/MKL thread count (OpenMP's nthreads ICV
and MKL's local setting are per thread); PyTorch's process-wide default, which that call also writes, is
restored when the pool finishes, and the calling thread's own setting is never touched.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

__all__ = ["map_single_threaded"]

T = TypeVar("T")
R = TypeVar("R")


def map_single_threaded(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` computed by ``workers`` (default ``torch.get_num_threads()``) threads with
    one intra-op thread each; in order. Serial (in the calling thread, its settings unchanged) for one worker
    or one item. ``fn`` must be safe to run concurrently on different items."""
    items = list(items)
    n = torch.get_num_threads() if workers is None else int(workers)
    n = min(n, len(items))
    if n <= 1:
        return [fn(x) for x in items]
    before = torch.get_num_threads()

    def run(x: T) -> R:
        torch.set_num_threads(1)
        return fn(x)

    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="floss") as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(before)   # the process-wide default the workers' calls overwrote
