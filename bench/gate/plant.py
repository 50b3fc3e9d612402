"""Planted slowdowns: the regression gate's self-test (``continuous --slow-down NAME=FACTOR``).

A planted initializer runs its own code, then busy-waits until ``FACTOR ×`` its own
measured call time has passed, so every timed call of that cell is slower by exactly
that factor (to the timer's resolution) while its result and its memory are untouched.
A busy-wait, not ``time.sleep``: a sleep overshoots by tens of microseconds, more than
the whole call of the smallest cells. On CUDA the call is synchronized first, so the
factor applies to the device's time, not to the launch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping


def parse_slow_down(items: list[str] | None, known: Mapping[str, Any]) -> dict[str, float]:
    """``["loram_dst=1.3", ...]`` → ``{"loram_dst": 1.3}``; NAME must be in ``known``
    (the registry), FACTOR a finite number > 1, no NAME twice."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--slow-down {item!r}: use NAME=FACTOR, e.g. loram_dst=1.3")
        if name not in known:
            raise ValueError(f"--slow-down {item!r}: unknown initializer {name!r}; known: {', '.join(sorted(known))}")
        try:
            factor = float(value)
        except ValueError:
            raise ValueError(f"--slow-down {item!r}: FACTOR must be a number > 1, e.g. 1.3") from None
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"--slow-down {item!r}: FACTOR must be a finite number > 1, got {value!r}")
        if name in out:
            raise ValueError(f"--slow-down names {name} twice")
        out[name] = factor
    return out


def _synchronize(args: tuple, kwargs: dict) -> None:
    weight = args[0] if args else kwargs.get("weight")
    if getattr(weight, "is_cuda", False):
        import torch

        torch.cuda.synchronize(weight.device)


def slowed(fn: Callable[..., Any], factor: float) -> Callable[..., Any]:
    """``fn`` taking ``factor ×`` its own time: it runs, then busy-waits the rest.
    ``functools.wraps`` keeps its signature (the harness inspects it for ``inplace``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        _synchronize(args, kwargs)
        until = started + factor * (time.perf_counter() - started)
        while time.perf_counter() < until:
            pass
        return out

    wrapper.planted_factor = factor  # type: ignore[attr-defined]
    return wrapper


def plant(registry: dict[str, Any], slow_down: Mapping[str, float]) -> None:
    """Replace each named spec of ``registry`` (``loram_ref.INITIALIZERS``) by one whose
    function is :func:`slowed` by its factor."""
    for name, factor in slow_down.items():
        if name not in registry:
            raise ValueError(f"cannot plant a slowdown in {name!r}: this loram_ref has no such initializer")
        spec = registry[name]
        registry[name] = dataclasses.replace(spec, fn=slowed(spec.fn, factor))
