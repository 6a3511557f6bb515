"""Static sharding for ``torchrun`` (one node or several): who am I, which ids are mine, wait for the others.

``torchrun --nproc_per_node=N -m floss extract ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (multi-node:
``--nnodes``/``--rdzv-endpoint``; under SLURM without torchrun, export ``RANK=$SLURM_PROCID``,
``WORLD_SIZE=$SLURM_NTASKS``, ``LOCAL_RANK=$SLURM_LOCALID``). Each process takes ``sorted(ids)[rank::world]``
(no padding, no duplicates, ecosystem-notes §D) and writes its own shards; no collective is needed except an
optional barrier so that rank 0 merges the manifests after every rank finished (without a process group the
last rank to finish merges, see :meth:`floss.data.cache.CacheWriter.close`).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, received {raw!r}") from None


def context() -> DistContext:
    """Rank, world size and local rank from the environment (defaults: a single process)."""
    ctx = DistContext(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size or ctx.local_rank < 0:
        raise ValueError(f"environment: expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, received RANK={ctx.rank}, "
                         f"WORLD_SIZE={ctx.world_size}, LOCAL_RANK={ctx.local_rank}")
    return ctx


def shard(ids: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share: ``sorted(ids)[rank::world]`` (deterministic, disjoint, no padded duplicates)."""
    return sorted(ids)[ctx.rank::ctx.world_size]


def device_for(requested: str | None, ctx: DistContext) -> torch.device:
    """``requested`` (``cpu``/``cuda``/``cuda:i``) or the default; ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} requested but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return dev


def init_process_group(ctx: DistContext, timeout_s: float = 3600.0) -> bool:
    """Join the torchrun process group (gloo: only a barrier is needed) when launched with several ranks."""
    if ctx.world_size == 1 or not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
