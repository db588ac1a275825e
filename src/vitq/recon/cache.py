"""Cached unit inputs / targets, in memory or streamed from disk, read in a fixed chunk schedule.

The calibration samples of every stream (quantized-model input ``xq``, float input ``xf``, float
target ``y``, Fisher weights ``g``) are stored as chunks of ``chunk_size`` samples. Training visits
the chunks in a seeded random order and draws ``ceil(chunk / batch)`` random mini-batches from each
visited chunk. The schedule does not depend on where the chunks live, so streaming from disk gives
bit-identical results to keeping them in memory; with one chunk (``N <= chunk_size``) it is plain
uniform mini-batch sampling as in the released QDrop code.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class ChunkStore:
    """Named streams of CPU tensor chunks; ``directory=None`` keeps them in memory."""

    def __init__(self, directory: Optional[Path] = None) -> None:
        self.dir = directory
        self.mem: dict[tuple[str, int], Tensor] = {}
        self.counts: dict[str, int] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def on_disk(self) -> bool:
        return self.dir is not None

    def _path(self, stream: str, i: int) -> Path:
        assert self.dir is not None
        return self.dir / f"{stream}-{i:05d}.pt"

    def put(self, stream: str, i: int, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if self.dir is None:
            self.mem[(stream, i)] = t
        else:
            torch.save(t, self._path(stream, i))
        self.counts[stream] = max(self.counts.get(stream, 0), i + 1)

    def get(self, stream: str, i: int) -> Tensor:
        if self.dir is None:
            return self.mem[(stream, i)]
        return torch.load(self._path(stream, i), map_location="cpu", weights_only=True)

    def has(self, stream: str) -> bool:
        return self.counts.get(stream, 0) > 0

    def chunks(self, stream: str) -> Iterator[Tensor]:
        for i in range(self.counts.get(stream, 0)):
            yield self.get(stream, i)

    def drop(self, stream: str) -> None:
        for i in range(self.counts.pop(stream, 0)):
            if self.dir is None:
                self.mem.pop((stream, i), None)
            else:
                self._path(stream, i).unlink(missing_ok=True)

    def rename(self, src: str, dst: str) -> None:
        self.drop(dst)
        n = self.counts.pop(src, 0)
        for i in range(n):
            if self.dir is None:
                self.mem[(dst, i)] = self.mem.pop((src, i))
            else:
                os.replace(self._path(src, i), self._path(dst, i))
        if n:
            self.counts[dst] = n

    def save_stream(self, stream: str, folder: Path, tag: str) -> int:
        """Persist a stream as ``folder/<tag>-<i>.pt`` (hard links when already on disk)."""
        folder.mkdir(parents=True, exist_ok=True)
        n = self.counts.get(stream, 0)
        for i in range(n):
            dst = folder / f"{tag}-{i:05d}.pt"
            dst.unlink(missing_ok=True)
            if self.dir is not None:
                try:
                    os.link(self._path(stream, i), dst)
                    continue
                except OSError:
                    pass
            torch.save(self.get(stream, i), dst)
        return n

    def load_stream(self, stream: str, folder: Path, tag: str, n: int) -> None:
        for i in range(n):
            self.put(stream, i, torch.load(folder / f"{tag}-{i:05d}.pt", map_location="cpu", weights_only=True))

    def close(self) -> None:
        self.mem.clear()
        self.counts.clear()
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]


def batch_schedule(chunk_lens: list[int], iters: int, batch_size: int,
                   gen: torch.Generator) -> Iterator[tuple[int, Tensor]]:
    """``iters`` pairs ``(chunk index, sample indices in that chunk)``: chunks in random order, each
    visit drawing ``ceil(len / batch)`` mini-batches without replacement inside a batch."""
    it = 0
    while it < iters:
        for c in torch.randperm(len(chunk_lens), generator=gen).tolist():
            n = chunk_lens[c]
            steps = max(1, -(-n // batch_size))
            for _ in range(steps):
                yield c, torch.randperm(n, generator=gen)[:batch_size]
                it += 1
                if it >= iters:
                    return
