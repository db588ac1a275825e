"""Slicings: how a model's chain of pieces is cut into reconstruction units.

A model is a chain of pieces (``Adapter.chain``): ``embed | attn, mlp (per block) | head``, with
Swin ``merge`` pieces (patch merging) at the start of stages 1..S-1. A *slicing* partitions the
chain into contiguous units; units are reconstructed one after another (BRECQ / QDrop / OAS).
A :class:`Slicing` is a frozen value; :meth:`Slicing.units` maps it onto a concrete chain.

Kinds (``Slicing.parse`` accepts the text form in brackets):

* ``half``      [``half``]      every piece is a unit (attention half, MLP half, ...).
* ``block``     [``block``]     one transformer block (attn + mlp halves) per unit.
* ``blocks:k``  [``blocks:2``]  k consecutive blocks per unit.
* ``stage``     [``stage``]     a whole Swin stage (its patch merging + all its blocks) per unit.
* ``model``     [``model``]     every block (and merge) in one unit.
* ``groups``    [``groups:1,2,3``] MRECG-style block-group sizes, in order (sum = number of blocks).
* ``cuts``      [``cuts:0,1,3,5``] explicit piece indices where a unit starts (anything goes).

Snap-to-block rules (every kind except ``cuts``):

1. A unit never splits a piece, and only ``half`` splits a block into its two halves.
2. ``embed`` and ``head`` are always units of their own (as BRECQ / I&S-ViT reconstruct the first
   and last layer on their own).
3. A Swin patch merging is its own unit, except in ``stage`` (it joins the stage it starts) and
   ``model`` / ``groups`` (it joins its group when the group continues across it).
4. ``blocks:k`` restarts its count at every Swin stage, so a unit never spans a patch merging;
   the last unit of a stage may hold fewer than k blocks. ViT / DeiT have one stage.
5. ``stage`` needs stages (Swin); on a single-stage model use ``model`` or ``blocks:k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..adapters.base import Piece
from ..errors import ConfigError

KINDS = ("half", "block", "blocks", "stage", "model", "groups", "cuts")
_HELP = "use half, block, blocks:K, stage, model, groups:G1,G2,... or cuts:I0,I1,..."


@dataclass(frozen=True)
class Slicing:
    kind: str = "block"
    k: int = 1
    sizes: tuple[int, ...] = ()  # groups: block-group sizes; cuts: piece indices where units start

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown slicing {self.kind!r}: {_HELP}")
        if self.kind == "blocks" and (not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"slicing blocks:{self.k} needs a positive integer block count, e.g. blocks:2")
        if self.kind in ("groups", "cuts") and not self.sizes:
            raise ConfigError(f"slicing {self.kind} needs a list, e.g. {self.kind}:1,2,3")
        if self.kind == "groups" and any(s < 1 for s in self.sizes):
            raise ConfigError(f"slicing groups:{','.join(map(str, self.sizes))} needs positive group sizes")
        if self.kind == "cuts" and (list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] != 0):
            raise ConfigError("slicing cuts:... must be increasing piece indices starting at 0, e.g. cuts:0,1,3")

    # -- text form -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: "str | Slicing") -> "Slicing":
        if isinstance(text, Slicing):
            return text
        t = str(text).strip().lower().replace(" ", "")
        kind, _, arg = t.partition(":")
        if kind in ("half", "block", "stage", "model") and not arg:
            return cls(kind)
        try:
            if kind == "blocks":
                return cls("blocks", k=int(arg))
            if kind in ("groups", "cuts"):
                return cls(kind, sizes=tuple(int(v) for v in arg.strip("[]()").split(",") if v != ""))
        except ValueError:
            pass
        raise ConfigError(f"malformed slicing {text!r}: {_HELP}")

    def __str__(self) -> str:
        if self.kind == "blocks":
            return f"blocks:{self.k}"
        if self.kind in ("groups", "cuts"):
            return f"{self.kind}:{','.join(map(str, self.sizes))}"
        return self.kind

    @classmethod
    def from_units(cls, chain: Sequence[Piece], units: Sequence[Sequence[str]]) -> "Slicing":
        """An explicit slicing from lists of piece names, e.g. ``[["embed"], ["blocks.0.attn", ...]]``."""
        names = [p.name for p in chain]
        flat = [n for u in units for n in u]
        if flat != names:
            raise ConfigError("explicit units must list every piece of the chain once, in chain order "
                              f"({', '.join(names[:4])}, ...)")
        cuts, i = [], 0
        for u in units:
            if not u:
                raise ConfigError("explicit units must not be empty")
            cuts.append(i)
            i += len(u)
        return cls("cuts", sizes=tuple(cuts))

    # -- mapping onto a chain ----------------------------------------------------------------------
    def units(self, chain: Sequence[Piece]) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` piece index ranges (end exclusive) covering the chain exactly once."""
        n = len(chain)
        if n == 0:
            raise ConfigError("the model chain is empty: nothing to reconstruct")
        if self.kind == "cuts":
            if self.sizes[-1] >= n:
                raise ConfigError(f"slicing {self}: piece index {self.sizes[-1]} is beyond the chain ({n} pieces)")
            starts = list(self.sizes)
        else:
            starts = sorted(self._starts(chain))
        bounds = starts + [n]
        return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]

    def _starts(self, chain: Sequence[Piece]) -> set[int]:
        n = len(chain)
        starts = {0}
        for i, p in enumerate(chain):  # rule 2: embed and head stand alone
            if p.kind in ("embed", "head"):
                starts.add(i)
                if i + 1 < n:
                    starts.add(i + 1)
        if self.kind == "half":
            return set(range(n))
        blocks = [p.block for p in chain if p.block >= 0]
        if not blocks:
            raise ConfigError(f"slicing {self} needs transformer blocks in the chain: use cuts:...")
        stage_of = {p.block: p.stage for p in chain if p.block >= 0}
        first_of_stage: dict[int, int] = {}
        for b in sorted(set(blocks)):
            first_of_stage.setdefault(stage_of[b], b)
        if self.kind == "stage" and all(s < 0 for s in stage_of.values()):
            raise ConfigError("slicing 'stage' needs a multi-stage model (Swin): use model or blocks:K")
        nblocks = max(blocks) + 1
        if self.kind == "groups" and sum(self.sizes) != nblocks:
            raise ConfigError(f"slicing {self}: group sizes sum to {sum(self.sizes)}, the model has {nblocks} blocks")
        group_start = self._group_starts(nblocks, stage_of, first_of_stage)
        seen: set[int] = set()
        for i, p in enumerate(chain):
            if p.block >= 0 and p.block not in seen:  # first piece of a block
                seen.add(p.block)
                merged_in = self.kind == "stage" and i > 0 and chain[i - 1].kind == "merge"
                if p.block in group_start and not merged_in:
                    starts.add(i)
            elif p.kind == "merge":  # rule 3
                nxt = next((q.block for q in chain[i + 1:] if q.block >= 0), None)
                if self.kind == "stage":
                    starts.add(i)  # the merge opens its stage's unit
                elif not (self.kind in ("model", "groups") and i > 0 and nxt is not None
                          and nxt not in group_start):
                    starts.update(j for j in (i, i + 1) if j < n)  # a unit of its own
        return starts

    def _group_starts(self, nblocks: int, stage_of: dict[int, int], first_of_stage: dict[int, int]) -> set[int]:
        """Blocks that open a unit."""
        if self.kind == "block":
            return set(range(nblocks))
        if self.kind == "blocks":
            return {b for b in range(nblocks) if (b - first_of_stage[stage_of[b]]) % self.k == 0}
        if self.kind == "stage":
            return set(first_of_stage.values())
        if self.kind == "model":
            return {0}
        out, b = set(), 0  # groups
        for s in self.sizes:
            out.add(b)
            b += s
        return out


def describe_units(chain: Sequence[Piece], units: Sequence[tuple[int, int]]) -> list[str]:
    """Human-readable unit names: ``blocks.0.attn..blocks.1.mlp``."""
    out = []
    for a, b in units:
        out.append(chain[a].name if b - a == 1 else f"{chain[a].name}..{chain[b - 1].name}")
    return out


def blocks_per_unit(chain: Sequence[Piece], units: Sequence[tuple[int, int]]) -> float:
    """Mean unit size in transformer blocks over the units that hold block pieces (half = 0.5)."""
    sizes = []
    for a, b in units:
        halves = sum(1 for p in chain[a:b] if p.block >= 0)
        if halves:
            sizes.append(halves / 2.0)
    return sum(sizes) / len(sizes) if sizes else 0.0
