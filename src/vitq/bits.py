"""Bit-widths: the one range rule (:func:`check_width`), ``WxAy`` (:class:`Bits`) and a run's bits, which
may also be ``auto`` / ``autoA4`` (weight bits chosen per site under a budget: :func:`parse_run_bits`).

Every width vitq takes - a run's ``WxAy``, a recipe rule's fixed ``bits: 8``, a quantizer spec, a ``when``
condition, a mixed-precision choice - is checked here, by one rule: an integer from 2 to 8. Integer
runtimes hold codes in 8-bit containers; a site that needs more than 8 bits stays float (``null``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_BITS_RE = re.compile(r"^[Ww](\d+)[Aa](\d+)$")
_AUTO_RE = re.compile(r"^(?:[Ww])?auto(?:[Aa](\d+))?$")
MIN_BITS, MAX_BITS = 2, 8


def check_width(v: Any, what: str = "bit-width") -> int:
    """``v`` as a bit-width, or a one-line ConfigError: an integer from :data:`MIN_BITS` to :data:`MAX_BITS`."""
    if isinstance(v, bool) or not isinstance(v, int) or not MIN_BITS <= v <= MAX_BITS:
        raise ConfigError(f"{what} {v!r} is out of range: use an integer from {MIN_BITS} to {MAX_BITS} (a site that needs "
                          "more stays float: rule null)")
    return int(v)


@dataclass(frozen=True)
class Bits:
    w: int
    a: int

    def __post_init__(self) -> None:
        for what, v in (("weight", self.w), ("activation", self.a)):
            try:
                check_width(v, f"{what} bit-width")
            except ConfigError:
                raise ConfigError(f"{what} bit-width {v!r} is out of range: use WxAy with x, y in {MIN_BITS}..{MAX_BITS} "
                                  "(e.g. W4A4)") from None

    @classmethod
    def parse(cls, text: "str | Bits") -> "Bits":
        if isinstance(text, Bits):
            return text
        m = _BITS_RE.match(str(text).strip())
        if not m:
            raise ConfigError(f"malformed bit-width {text!r}: write WxAy with x, y in {MIN_BITS}..{MAX_BITS}, e.g. W8A8 or W4A4")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"W{self.w}A{self.a}"


def parse_auto(text: str) -> "int | None":
    """``auto`` -> 8 (the activation bits), ``autoA4`` / ``WautoA4`` -> 4; None when ``text`` is not an auto form."""
    m = _AUTO_RE.match(str(text).strip())
    if not m:
        return None
    return check_width(int(m.group(1) or 8), "activation bit-width")


def parse_run_bits(text: "str | Bits") -> tuple[Bits, bool]:
    """A run's bits: ``(Bits, False)`` for ``WxAy``; ``(Bits(8, a), True)`` for ``auto`` / ``autoAa`` (weight bits
    are then chosen per site; 8 stands for them until they are)."""
    if isinstance(text, Bits):
        return text, False
    a = parse_auto(str(text))
    if a is not None:
        return Bits(8, a), True
    return Bits.parse(text), False


__all__ = ["MAX_BITS", "MIN_BITS", "Bits", "check_width", "parse_auto", "parse_run_bits"]
