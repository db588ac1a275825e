"""Insert FakeQuants into a wrapped model by the recipe's role rules."""

from __future__ import annotations

from typing import Any, Optional, Protocol

from torch import nn

from ..bits import Bits
from ..nn import FakeQuant, QSoftmax, QuantSlots
from ..quantizers.base import QuantSpec
from ..roles import Role


class SiteRules(Protocol):
    """What inserting quantizers needs of a recipe (:class:`vitq.recipes.Recipe` is one): the rule of
    each site and the softmax implementation. Passes sit below recipes, so they name only this."""

    @property
    def softmax(self) -> str: ...

    def rule_for(self, kind: str, role: Role, module_name: str) -> Optional["SiteRule"]: ...


class SiteRule(Protocol):
    def resolve(self, bits: Bits) -> QuantSpec: ...


def iter_slots(model: nn.Module):  # type: ignore[no-untyped-def]
    """Yield ``(module_name, module, slot, role, kind)`` for every quantization slot."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantSlots):
            for slot, role, kind in mod.slots():
                yield name, mod, slot, role, kind


def insert_quantizers(model: nn.Module, recipe: SiteRules, bits: Bits) -> nn.Module:
    for name, mod, slot, role, kind in iter_slots(model):
        rule = recipe.rule_for(kind, role, name)
        fq = None if rule is None else FakeQuant(rule.resolve(bits), role, site=f"{name}.{slot}", kind=kind)
        setattr(mod, slot, fq)
    for mod in model.modules():
        if isinstance(mod, QSoftmax):
            mod.impl = recipe.softmax
    return model


def manifest(model: nn.Module) -> list[dict[str, Any]]:
    """Every quantization slot: what quantizer, bits, granularity - or ``float`` if left alone."""
    out = []
    for name, mod, slot, role, kind in iter_slots(model):
        fq = getattr(mod, slot)
        if isinstance(fq, FakeQuant):
            out.append(fq.manifest_entry())
        else:
            out.append({"site": f"{name}.{slot}", "role": str(role), "kind": kind, "quantizer": "float"})
        if isinstance(mod, QSoftmax):
            out[-1]["softmax"] = mod.impl
    return out
