"""Name → initializer registry. Modules register their functions with ``@register``.

Every per-initializer fact the benchmark needs lives on its :class:`InitializerSpec`: the
step-0 invariant class, the statistics it consumes (with their synthetic maker and their
collector), how its cost grows with the layer shape, the paper, and a display label.
Nothing outside the registry keeps lists of initializer names.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Mapping

from .guard import guard
from .result import LoraInit
from .statistics.kinds import NO_STATISTICS, Statistics, StatisticsKind
from .work import Work

__all__ = [
    "FULL_SVD",
    "HARNESS_ROLES",
    "INPUT_SPACE",
    "INITIALIZERS",
    "PASSES",
    "CostClass",
    "InitializerSpec",
    "Invariant",
    "PublishedScaling",
    "Statistics",
    "StatisticsKind",
    "get_initializer",
    "register",
]


class Invariant(str, Enum):
    """The step-0 invariant class of an initializer (docs/initializers.md §0)."""

    FUNCTION_PRESERVING = "F"  # W_res + s·B·A == W
    ZERO_PRODUCT = "Z"  # B·A == 0 and W unchanged
    SHIFTED = "S"  # W unchanged, s·B·A != 0 on purpose
    QUANTIZED = "Q"  # W_res = dequant(quant(W − s·B·A)): W_res + s·B·A ≈ W closer than W_res alone

    @property
    def rewrites_weight(self) -> bool:
        """Whether the method replaces the frozen weight (a residual, or its quantized form)."""
        return self in (Invariant.FUNCTION_PRESERVING, Invariant.QUANTIZED)


def _mn(m: int, n: int) -> float:
    return float(m) * n


def _mn_min(m: int, n: int) -> float:
    return float(m) * n * min(m, n)


def _n2_m_plus_n(m: int, n: int) -> float:
    return float(n) * n * (m + n)


@dataclass(frozen=True)
class CostClass:
    """How an initializer's work grows with the layer shape ``m x n`` (docs/initializers.md §8).

    ``size(m, n)`` is the natural size variable ``x`` of the algorithm: its cost is
    asymptotically linear in ``x``, so a cost law ``t = c·x`` fitted at one shape
    extrapolates to the others (``bench.core.costlaw``).
    """

    name: str
    size: Callable[[int, int], float]


#: A fixed number of passes over W, or a GEMM with a fixed rank: O(m·n).
PASSES = CostClass("m·n", _mn)
#: A full decomposition of W: O(m·n·min(m, n)).
FULL_SVD = CostClass("m·n·min(m,n)", _mn_min)
#: n x n input-space work (Cholesky, Z⁻¹, Δ̂ᵀΔ̂, an eigensolver on Ω): O(n³ + m·n²), docs/initializers.md §4 "Cost".
INPUT_SPACE = CostClass("n²·(m+n)", _n2_m_plus_n)


@dataclass(frozen=True)
class PublishedScaling:
    """The LoRA scaling a method is trained with in its paper or official code.

    ``s = α / r`` (PEFT), or ``s = α / √r`` with rsLoRA. ``alpha=None`` means α = r
    (s = 1), the convention of most of the papers. The loss benchmark trains every
    initializer at one shared scaling by default; ``--scaling published`` uses these.
    """

    alpha: float | None = None
    rslora: bool = False
    source: str = "α = r (s = 1)"

    def lora_alpha(self, rank: int) -> float:
        return float(rank) if self.alpha is None else float(self.alpha)

    def scaling(self, rank: int) -> float:
        alpha = self.lora_alpha(rank)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


@dataclass(frozen=True)
class InitializerSpec:
    """One registered initializer and every fact about it the harness and report use."""

    name: str
    fn: Callable[..., LoraInit]
    invariant: Invariant
    statistics: StatisticsKind
    cost: CostClass
    paper: str
    summary: str
    label: str
    #: whether the method reads W's values (noise-zeros ones use only its shape; they do not scan it)
    reads_weight: bool = True
    #: ``fidelity(weight, rank, init, kwargs) -> {name: value}``: how far an approximate
    #: method is from the exact computation (``loram_ref.fidelity``); None for exact ones
    fidelity: Callable[..., dict] | None = None
    #: ``work(m, n, r, itemsize) -> Work``: bytes and flops the algorithm must move
    #: (``loram_ref.work``), from which the harness derives each cell's hardware floor
    work: Callable[..., Work] | None = None
    #: the scaling the method is published with (``--scaling published`` in the loss benchmark)
    published: PublishedScaling = field(default_factory=PublishedScaling)
    #: ``from_svd(u_r, s_r, vh_r, scaling) -> LoraInit``: the same factors from W's top-r
    #: singular triplets when the caller knows them (a W built from its SVD), for methods
    #: whose only use of W is that decomposition; the residual is left to the caller
    from_svd: Callable[..., LoraInit] | None = None
    #: ``rescale(init, factor) -> LoraInit``: the result for statistics scaled by ``factor``
    #: (those of a learning rate ``factor`` times the one they were collected at,
    #: ``StatisticsKind.lr_rescale``), for methods homogeneous in their statistics; a
    #: learning-rate grid then runs the method once per seed
    rescale: Callable[[LoraInit, float], LoraInit] | None = None
    #: what the harness may pass the function, by role (:data:`HARNESS_ROLES`), each mapped
    #: to the keyword that takes it: ``{"generator": "rng"}`` for a method whose random
    #: source is called ``rng``. Declared at registration, never guessed from names.
    harness: Mapping[str, str] = field(default_factory=dict)
    #: PEFT's ``init_lora_weights`` value for the same method (None: PEFT does not offer it)
    peft_name: str | None = None
    #: the decomposition the method computes, in words ("none" for the noise inits)
    decomposition: str = "none"
    #: the factors that train: ``("A", "B")``, ``("R",)`` for LoRA-SB (A and B frozen),
    #: ``("A",)`` for MiCA (B frozen)
    trains: tuple[str, ...] = ("A", "B")
    #: why the layer-level loss task cannot run the method (None: it can)
    layer_task_excluded: str | None = None
    #: ``rank_rule(m, n, r) -> None | reason``: a rank the method cannot take at an m x n
    #: layer beyond ``1 <= r <= min(m, n)`` (an odd rank for PEFT's orthogonal, 2r > min(m, n)
    #: for LoRA-GA); the function raises with the same reason
    rank_rule: Callable[[int, int, int], str | None] | None = None

    @property
    def needs_statistics(self) -> bool:
        return self.statistics.needed

    def facts(self) -> dict[str, str]:
        """What a user choosing among initializers asks first, in words (``loram-bench list``
        and the report's decision summary): data, the base weight, the decomposition, how the
        cost grows, what trains, PEFT's name for it."""
        rewrites = {Invariant.FUNCTION_PRESERVING: "yes: W_res = W − s·B·A",
                    Invariant.QUANTIZED: "yes: W → its quantized form"}.get(self.invariant, "no")
        return {
            "needs data": f"yes: {self.statistics.label}" if self.needs_statistics else "no",
            "rewrites W": rewrites,
            "decomposition": self.decomposition,
            "cost class": f"O({self.cost.name})" if self.reads_weight or self.cost is not PASSES
            else "O((m+n)·r): W is not read",
            "trains": ", ".join(self.trains),
            "PEFT name": f"init_lora_weights={self.peft_name}" if self.peft_name else "not in PEFT",
        }

    @property
    def peft_init(self) -> bool | str | None:
        """PEFT's ``init_lora_weights`` value for the method, the literal ``peft_name`` opens
        with (``"pissa"``, ``True``); None where PEFT does not offer it."""
        if self.peft_name is None:
            return None
        head = self.peft_name.split(" (", 1)[0].strip()
        if head in ("True", "False"):
            return head == "True"
        if len(head) > 2 and head[0] == head[-1] == '"':
            return head[1:-1]
        raise ValueError(f"initializer {self.name!r}: peft_name must open with PEFT's init_lora_weights value, a "
                         f"quoted string or True, then an optional note in parentheses; got {self.peft_name!r}")

    def rank_problem(self, m: int, n: int, rank: int) -> str | None:
        """Why ``rank`` does not fit an m x n layer for this method (None: it fits)."""
        if not 1 <= rank <= min(m, n):
            return f"rank {rank} is outside 1..min(d_out, d_in) = {min(m, n)}"
        return self.rank_rule(m, n, rank) if self.rank_rule is not None else None

    def harness_kwargs(self, **values: Any) -> dict[str, Any]:
        """The keywords of a harness call: each role in ``values`` that the method declares,
        under its keyword (roles it does not declare, and ``None`` values, are left out)."""
        unknown = set(values) - set(HARNESS_ROLES)
        if unknown:
            raise ValueError(f"unknown harness role(s) {sorted(unknown)}; known: {', '.join(HARNESS_ROLES)}")
        return {self.harness[role]: value for role, value in values.items()
                if role in self.harness and value is not None}


INITIALIZERS: dict[str, InitializerSpec] = {}

#: The roles of the keywords a harness passes: ``inplace`` (the residual may overwrite the
#: weight's storage), ``check_input`` (False skips the finiteness scan), ``generator`` (the
#: random source, seeded per layer), ``module`` (the layer's name in its model).
HARNESS_ROLES = ("inplace", "check_input", "generator", "module")


def _harness_map(name: str, fn: Callable[..., LoraInit], harness: Iterable[str] | Mapping[str, str]
                 ) -> dict[str, str]:
    """The declared roles, checked against ``fn``'s keywords: each maps to a keyword ``fn``
    has, and a keyword named like a role must be declared (forgetting fails at import)."""
    roles = dict(harness) if isinstance(harness, Mapping) else {role: role for role in harness}
    params = inspect.signature(fn).parameters
    for role, keyword in roles.items():
        if role not in HARNESS_ROLES:
            raise ValueError(f"initializer {name!r} declares unknown harness role {role!r}; known: "
                             f"{', '.join(HARNESS_ROLES)}")
        if keyword not in params:
            raise ValueError(f"initializer {name!r} declares harness role {role!r} as keyword {keyword!r}, "
                             f"which {fn.__name__} does not take")
    undeclared = [k for k in HARNESS_ROLES if k in params and k not in roles.values()]
    if undeclared:
        raise ValueError(f"initializer {name!r} takes {', '.join(map(repr, undeclared))} without declaring it: add "
                         f"harness=({', '.join(map(repr, undeclared))},) to its register(...) (or map the role to "
                         "the keyword that takes it)")
    return roles


def register(
    name: str,
    *,
    invariant: Invariant,
    paper: str,
    summary: str,
    statistics: StatisticsKind = NO_STATISTICS,
    cost: CostClass = PASSES,
    label: str | None = None,
    reads_weight: bool = True,
    fidelity: Callable[..., dict] | None = None,
    work: Callable[..., Work] | None = None,
    published: PublishedScaling | None = None,
    from_svd: Callable[..., LoraInit] | None = None,
    rescale: Callable[[LoraInit, float], LoraInit] | None = None,
    harness: Iterable[str] | Mapping[str, str] = (),
    peft_name: str | None = None,
    decomposition: str = "none",
    trains: tuple[str, ...] = ("A", "B"),
    layer_task_excluded: str | None = None,
    rank_rule: Callable[[int, int, int], str | None] | None = None,
) -> Callable[[Callable[..., LoraInit]], Callable[..., LoraInit]]:
    """Add the decorated function to ``INITIALIZERS`` under ``name``; ``harness`` declares
    the keywords a harness may pass it (:data:`HARNESS_ROLES`)."""

    def decorate(fn: Callable[..., LoraInit]) -> Callable[..., LoraInit]:
        if name in INITIALIZERS:
            raise ValueError(f"initializer {name!r} is registered twice")
        roles = _harness_map(name, fn, harness)
        if not trains or set(trains) - {"A", "B", "R"}:
            raise ValueError(f"initializer {name!r}: trains must name some of 'A', 'B', 'R', got {trains!r}")
        guarded = guard(fn)
        spec = InitializerSpec(
            name=name,
            fn=guarded,
            invariant=invariant,
            statistics=statistics,
            cost=cost,
            paper=paper,
            summary=summary,
            label=label or name,
            reads_weight=reads_weight,
            fidelity=fidelity,
            work=work,
            published=published or PublishedScaling(),
            from_svd=from_svd,
            rescale=rescale,
            harness=roles,
            peft_name=peft_name,
            decomposition=decomposition,
            trains=tuple(trains),
            layer_task_excluded=layer_task_excluded,
            rank_rule=rank_rule,
        )
        spec.peft_init  # noqa: B018  (a malformed peft_name fails at import)
        INITIALIZERS[name] = spec
        return guarded

    return decorate


def get_initializer(name: str) -> InitializerSpec:
    """Look up an initializer by name; unknown names list the known ones."""
    if name not in INITIALIZERS:
        known = ", ".join(sorted(INITIALIZERS))
        raise ValueError(f"unknown initializer {name!r}; known initializers: {known}")
    return INITIALIZERS[name]
