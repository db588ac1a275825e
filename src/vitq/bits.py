"""Bit-width settings: ``WxAy``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_BITS_RE = re.compile(r"^[Ww](\d+)[Aa](\d+)$")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class Bits:
    w: int
    a: int

    def __post_init__(self) -> None:
        for what, v in (("weight", self.w), ("activation", self.a)):
            if not MIN_BITS <= v <= MAX_BITS:
                raise ConfigError(
                    f"{what} bit-width {v} is out of range: use WxAy with x, y in {MIN_BITS}..{MAX_BITS} (e.g. W4A4)"
                )

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
