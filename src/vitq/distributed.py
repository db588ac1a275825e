"""Several processes, one result: ``torchrun --nproc-per-node N -m vitq quantize ...`` (or the Python
API inside an initialised process group).

What runs where, and why the result equals one process's:

* **evaluation**: each rank evaluates a contiguous block of the test set (:func:`shard`, whole batches, no
  padded duplicates), and ``evaluate(..., sharded=True)`` concatenates the per-image results in rank order,
  which is the test set's order: top-1, the paired tests and the JSON are a single process's;
* **calibration** (the ``calibrate`` pass): whole calibration batches are dealt to the ranks
  (:func:`owned_batches`); each batch is computed as one process computes it. Every observer
  replays the single process's bounded-sample bookkeeping on row *indices* (:class:`SamplePlan`),
  keeps the rows of its own batches that the single process would have kept, and the ranks merge
  min / max (all-reduce) and the kept rows (all-gather, ordered by index) before computing the
  parameters, so those are bit for bit a single process's;
* **reconstruction**: each iteration's batch is split across the ranks, each rank's loss weighted by
  its share, gradients all-reduced (summed), random QDrop masks drawn for the whole batch on every
  rank and sliced: the same step as one process within float tolerance (the summation order differs);
* every other pass runs on every rank with all the calibration images (replicated: exact, no speed-up);
* only rank 0 prints and writes files; an exception on any rank ends every rank (torchrun's
  ``--max-restarts 0`` default takes the job down, with the failing rank's message on its stderr).

With one process (no process group) every function here is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this rank's
    device (``cuda:LOCAL_RANK`` when ``device`` is a GPU)."""
    if not launched() or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise ConfigError(f"rank {os.environ.get('RANK')} has LOCAL_RANK {local} but this machine has {n} GPU(s): "
                              f"pass --nproc-per-node {n} or fewer")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, r: Optional[int] = None, w: Optional[int] = None) -> range:
    """Rank ``r``'s contiguous block of ``n`` items: sizes differ by at most one, no duplicates."""
    r, w = rank() if r is None else r, world() if w is None else w
    return range(r * n // w, (r + 1) * n // w)


def shard(ds: Any, batch_size: int = 1) -> Any:
    """This rank's contiguous block of a dataset, in whole batches of ``batch_size`` (the dataset itself
    with one process): every rank's batches are one process's batches, image for image, so even the
    floating-point results (which can depend on a batch's composition) are a single process's."""
    if not active():
        return ds
    from torch.utils.data import Subset

    n = len(ds)
    batches = shard_range((n + batch_size - 1) // batch_size)
    return Subset(ds, list(range(batches.start * batch_size, min(batches.stop * batch_size, n))))


def owned_batches(n_batches: int) -> list[int]:
    """The calibration batches this rank computes: batch ``b`` goes to rank ``b % world``."""
    return [b for b in range(n_batches) if b % world() == rank()]


def _group_device(t: Tensor) -> Tensor:
    return t.cuda() if dist.get_backend() == "nccl" and not t.is_cuda else t


def all_gather_objects(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In place: ``sum`` / ``min`` / ``max`` of ``t`` over the ranks (a no-op with one process)."""
    if not active():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    g = _group_device(t)
    dist.all_reduce(g, op=ops[op])
    if g is not t:
        t.copy_(g)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same_everywhere(value: Any, what: str) -> None:
    """A one-line error when ranks disagree on ``value`` (e.g. different data or arguments)."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        raise ConfigError(f"the ranks disagree on {what} ({values[0]!r} on rank 0): start every rank with the same "
                          "arguments and data")


@dataclass
class SamplePlan:
    """The global calibration batches (images per batch) and the one being computed now; shared by
    every observer of a distributed ``calibrate`` pass (module docstring)."""

    batch_images: Sequence[int]
    current: int = -1
    owned: set[int] = field(default_factory=set)


def survivors(plan: SamplePlan, rows_per_image: int, max_rows: int, gen: torch.Generator) -> Tensor:
    """The row indices (ascending) a single process's observer keeps after every batch of ``plan``:
    its bookkeeping (append the batch's rows; above ``max_rows`` keep a sorted ``randperm`` prefix,
    from the same seeded generator) replayed on indices instead of values."""
    ids: Optional[Tensor] = None
    offset = 0
    for n_img in plan.batch_images:
        rows = torch.arange(offset, offset + n_img * rows_per_image)
        offset += n_img * rows_per_image
        ids = rows if ids is None else torch.cat([ids, rows])
        if ids.shape[0] > max_rows:
            keep = torch.randperm(ids.shape[0], generator=gen)[:max_rows]
            ids = ids[keep.sort().values]
    assert ids is not None
    return ids


def batch_offsets(plan: SamplePlan, rows_per_image: int) -> list[int]:
    out, offset = [], 0
    for n_img in plan.batch_images:
        out.append(offset)
        offset += n_img * rows_per_image
    return out


__all__ = ["SamplePlan", "active", "all_gather_objects", "all_reduce_", "batch_offsets", "broadcast_object",
           "check_same_everywhere", "init_from_env", "is_main", "launched", "owned_batches",
           "rank", "shard", "shard_range", "shutdown", "survivors", "world"]
