"""Many processes: ranks, shards and collectives of :mod:`torch.distributed`.

snnadv runs unchanged under ``torchrun --nproc-per-node N $(which snnadv) ...``: torchrun
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous in the environment, and
:func:`init_from_env` joins the process group (NCCL for CUDA devices, gloo for CPUs).
Without torchrun nothing here starts: :func:`world` is one process of rank 0 and every
collective is the identity, so a single process behaves exactly as before.

What is sharded where (the computation core stays single-process code that asks
:func:`world` for its share):

* training (:func:`snnadv.training.fit`): every rank draws the same per-epoch
  permutation and augmentation of the *global* batch and trains on its contiguous
  slice (:func:`shard`); DDP averages the gradients, each rank's loss weighted by its
  share, so an update equals one process's on the whole global batch;
* conversion (:func:`snnadv.conversion.balance_thresholds`): batch i goes to rank
  i mod N; the maximum is an all-reduce, the exact percentile the top-k of the
  gathered candidates;
* evaluation and attacks: the images are split in contiguous shards and the
  per-sample results gathered back in the original order (:func:`gather_cat`).

Computation only: nothing here prints or writes a file.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``; ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE``) started this process
    as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


_solo = [False]


def world() -> World:
    """The current :class:`World` (one process of rank 0 unless a process group is up,
    and inside :func:`solo`)."""
    if _solo[0] or not initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_rank() -> int:
    """This process's rank in the process group (0 without one), also inside :func:`solo`."""
    return dist.get_rank() if initialized() else 0


@contextmanager
def solo():
    """Inside the block this rank works alone, as a single process (an independent job:
    e.g. one seed's chain of ``reproduce --spread``): :func:`world` is one process of
    rank 0 and the collectives are identities."""
    was = _solo[0]
    _solo[0] = True
    try:
        yield
    finally:
        _solo[0] = was


def backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors where CUDA is available (one group
    serves both: a rank may hold CPU and GPU tensors)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def timeout_minutes() -> float:
    """How long a rank waits for the others at a collective: ``$SNNADV_DIST_TIMEOUT``
    minutes, default 1440 (a day: with ``reproduce --spread`` a rank waits for the other
    seed's whole training).  A rank that fails does not make the others wait: torchrun
    ends them at once."""
    try:
        return float(os.environ.get("SNNADV_DIST_TIMEOUT") or 1440)
    except ValueError:
        return 1440.0


def init_from_env() -> World:
    """Join the process group torchrun described in the environment (once; a no-op in a
    single process); with CUDA each rank takes GPU ``LOCAL_RANK``."""
    if launched() and not initialized():
        from datetime import timedelta

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend(), timeout=timedelta(minutes=timeout_minutes()))
    return world()


def rank_device(device: str | torch.device) -> torch.device:
    """``device`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and initialized():
        return torch.device("cuda", world().local_rank % torch.cuda.device_count())
    return d


def shard(n: int, w: World | None = None) -> slice:
    """This rank's contiguous share of ``n`` items: ranks get ``n // size`` or one more,
    in rank order, so concatenating the shards in rank order gives back ``range(n)``."""
    w = w or world()
    return slice(w.rank * n // w.size, (w.rank + 1) * n // w.size)


def gather_cat(x: torch.Tensor, w: World | None = None) -> torch.Tensor:
    """The ranks' ``x`` (any first dimension each; same trailing shape and dtype)
    concatenated in rank order, on every rank; ``x`` itself in a single process."""
    w = w or world()
    if not w.distributed:
        return x
    dtype = x.dtype
    y = x.to(torch.uint8) if dtype == torch.bool else x  # (gloo has no bool)
    y = y.contiguous()
    sizes = torch.tensor([y.shape[0]], dtype=torch.int64, device=y.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(w.size)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    pad = y.new_zeros((max(counts), *y.shape[1:]))
    pad[:y.shape[0]] = y
    parts = [torch.empty_like(pad) for _ in range(w.size)]
    dist.all_gather(parts, pad)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.to(dtype)


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over the ranks (``sum`` or ``max``), in place and returned."""
    if world().distributed:
        dist.all_reduce(x, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop together)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    return bool(all_reduce(t, "max").item())


def barrier() -> None:
    if world().distributed:
        dist.barrier()
