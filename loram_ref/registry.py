"""Name → initializer registry. Modules register their functions with ``@register``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from .result import LoraInit


class Invariant(str, Enum):
    """The step-0 invariant class of an initializer (spec §0)."""

    FUNCTION_PRESERVING = "F"  # W_res + s·B·A == W
    ZERO_PRODUCT = "Z"  # B·A == 0 and W unchanged
    SHIFTED = "S"  # W unchanged, s·B·A != 0 on purpose


class Statistics(str, Enum):
    """What data-derived layer statistics an initializer needs, if any."""

    NONE = "none"
    LORA_SB = "lora_sb"  # loram_ref.stats.LoraSBStats
    LORA_DA = "lora_da"  # loram_ref.stats.LoraDAStats


@dataclass(frozen=True)
class InitializerSpec:
    name: str
    fn: Callable[..., LoraInit]
    invariant: Invariant
    statistics: Statistics
    paper: str
    summary: str


INITIALIZERS: dict[str, InitializerSpec] = {}


def register(
    name: str,
    *,
    invariant: Invariant,
    paper: str,
    summary: str,
    statistics: Statistics = Statistics.NONE,
) -> Callable[[Callable[..., LoraInit]], Callable[..., LoraInit]]:
    """Add the decorated function to ``INITIALIZERS`` under ``name``."""

    def decorate(fn: Callable[..., LoraInit]) -> Callable[..., LoraInit]:
        if name in INITIALIZERS:
            raise ValueError(f"initializer {name!r} is registered twice")
        INITIALIZERS[name] = InitializerSpec(
            name=name,
            fn=fn,
            invariant=invariant,
            statistics=statistics,
            paper=paper,
            summary=summary,
        )
        return fn

    return decorate


def get_initializer(name: str) -> InitializerSpec:
    """Look up an initializer by name; unknown names list the known ones."""
    if name not in INITIALIZERS:
        known = ", ".join(sorted(INITIALIZERS))
        raise ValueError(f"unknown initializer {name!r}; known initializers: {known}")
    return INITIALIZERS[name]
