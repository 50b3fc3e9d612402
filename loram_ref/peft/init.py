"""``initialize``: any registered initializer on the LoRA adapter of a ``peft.PeftModel``.

For every LoRA layer of the adapter (its target modules, ranks and scalings as its
``LoraConfig`` made them), the initializer runs on the frozen weight and its factors are
copied into ``lora_A`` and ``lora_B`` in place; where the method rewrites ``W`` (the F
and Q classes, docs/initializers.md §0) the base weight is replaced by its residual. What
the registry's ``trains`` leaves out is frozen (MiCA: B); LoRA-SB trains only the r x r
``R`` between frozen B and A, attached as a parametrization ``lora_A.weight = R·A``
(:class:`loram_ref.peft.layers.LeftMultiply`), so PEFT's forward is unchanged.

Data-aware methods get their statistics from one pass over ``data`` with the adapter
disabled (the base model's own gradients and activations), through the same sums and
derivations the benchmark uses (``loram_ref.statistics``).

On a model whose frozen weights are DTensors sharded on a 1-D mesh (FSDP2's
``fully_shard``, or ``distribute_tensor``), each layer runs the sharded initializer of the
same name where one exists (``loram_ref.sharded``) and the gather baseline otherwise
(every rank gathers ``W``, as PEFT does under ZeRO-3); every rank must call ``initialize``.

Each layer keeps its initial factors (``layer.loram_initial[adapter]``) for
:func:`loram_ref.peft.save_as_plain_lora`.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.utils import parametrize

from ..registry import InitializerSpec, Invariant, get_initializer
from ..statistics import CollectContext
from ..statistics.kinds import derive
from ..statistics.moments import collect_moments_from
from .checks import Norms, layer_norms
from .data import LossFn, steps
from .layers import LeftMultiply, Target, full_value, is_distributed, rebinds, targets, write, write_weight


@dataclass(frozen=True)
class Initial:
    """A layer's factors as ``initialize`` left them (what the plain-LoRA conversion needs)."""

    method: str
    invariant: Invariant
    A: torch.Tensor  # r x n, as stored (for LoRA-SB the frozen A, without R)
    B: torch.Tensor  # m x r
    scaling: float


@dataclass(frozen=True)
class LayerReport:
    """One layer's initialization: its time, how far it moved the layer, and the method's info.

    ``seconds`` is the initializer's call alone; ``output_shift``, ``weight_shift``,
    ``delta_norm`` and ``w_norm`` are Frobenius norms (``loram_ref.peft.checks``);
    ``factors_bound = s·‖B‖_F·‖A‖_F`` bounds ``‖s·B·A‖_F``, and ``eps`` is the larger
    machine epsilon of the base weight's and the factors' dtypes: the rounding scale of the
    checks (:meth:`holds`). ``placement`` is ``"whole"`` (one process), ``"sharded"`` (a
    sharded initializer) or ``"gathered"`` (the gather baseline), ``bytes_sent`` what this
    rank sent for it.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    seconds: float
    w_norm: float
    delta_norm: float
    output_shift: float
    weight_shift: float
    factors_bound: float = 0.0
    eps: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    placement: str = "whole"
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        for key in ("seconds", "w_norm", "delta_norm", "output_shift", "weight_shift", "factors_bound", "eps"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.name}: {key} must be finite and >= 0, got {value}")

    def relative(self, norm: float) -> float:
        return norm / self.w_norm if self.w_norm > 0 else (0.0 if norm == 0 else math.inf)

    @property
    def output_change(self) -> float:
        """``‖W' + s·B·A − W‖_F / ‖W‖_F``: how far the layer's function moved at step 0."""
        return self.relative(self.output_shift)

    @property
    def weight_change(self) -> float:
        """``‖W' − W‖_F / ‖W‖_F``: how far the frozen weight moved."""
        return self.relative(self.weight_shift)

    def holds(self, invariant: Invariant) -> bool:
        """Whether this layer keeps ``invariant``'s promise (docs/initializers.md §0), up to
        rounding: F, ``‖W' + s·B·A − W‖ ≤ 4·eps·(‖W‖ + s·‖B‖·‖A‖)``; Z, ``‖s·B·A‖ ≤
        4·eps·s·‖B‖·‖A‖`` (0 where a factor is 0; PEFT's orthogonal init is 0 through
        orthogonality); S, W not moved at all; Q, the adapter brings the layer closer to W
        than the quantized weight alone."""
        if invariant is Invariant.FUNCTION_PRESERVING:
            return self.output_shift <= 4 * self.eps * (self.w_norm + self.factors_bound)
        if invariant is Invariant.ZERO_PRODUCT:
            return self.weight_shift == 0 and self.output_shift <= 4 * self.eps * self.factors_bound
        if invariant is Invariant.SHIFTED:
            return self.weight_shift == 0
        return self.output_shift < self.weight_shift


#: What each invariant class promises, as (the relative quantity that must vanish, in words).
_PROMISE: dict[Invariant, tuple[str, str]] = {
    Invariant.FUNCTION_PRESERVING: ("output_change", "‖W_res + s·B·A − W‖/‖W‖ (0 up to W_res's rounding)"),
    Invariant.ZERO_PRODUCT: ("output_change", "‖s·B·A‖/‖W‖ (0 up to the factors' rounding)"),
    Invariant.SHIFTED: ("weight_change", "‖W' − W‖/‖W‖ (exactly 0: W is not touched)"),
    Invariant.QUANTIZED: ("output_change", "‖W_q + s·B·A − W‖/‖W‖ (below ‖W_q − W‖/‖W‖)"),
}


@dataclass(frozen=True)
class InitReport:
    """What :func:`initialize` did: per layer a :class:`LayerReport`, and the statistics pass."""

    method: str
    adapter: str
    invariant: Invariant
    layers: tuple[LayerReport, ...]
    seconds: float
    stats_seconds: float = 0.0
    stats_samples: int = 0
    #: False when ``initialize(verify=False)`` skipped the checks (the norms are then 0)
    verified: bool = True

    def invariant_errors(self) -> list[float]:
        """Per layer, the relative quantity the method's invariant class promises to be 0."""
        key = _PROMISE[self.invariant][0]
        return [getattr(layer, key) for layer in self.layers]

    @property
    def max_invariant_error(self) -> float:
        return max(self.invariant_errors(), default=0.0)

    @property
    def invariant_holds(self) -> bool | None:
        """Whether every layer keeps the method's promise (:meth:`LayerReport.holds`); None
        when the checks were skipped."""
        return all(layer.holds(self.invariant) for layer in self.layers) if self.verified else None

    def table(self) -> str:
        """The report as a fixed-width text table."""
        what = _PROMISE[self.invariant][1]
        lines = [f"{self.method} on adapter {self.adapter!r}: {len(self.layers)} layers in {self.seconds:.2f} s"
                 + (f" (statistics pass {self.stats_seconds:.2f} s over {self.stats_samples} samples)"
                    if self.stats_samples else ""),
                 (f"invariant ({self.invariant.value}): {what}; max {self.max_invariant_error:.3g}, "
                  f"{'holds' if self.invariant_holds else 'DOES NOT HOLD'}" if self.verified
                  else f"invariant ({self.invariant.value}): not checked (verify=False)"),
                 f"{'layer':<52} {'shape':>12} {'r':>4} {'seconds':>9} {'‖sBA‖/‖W‖':>10} {'invariant':>10}"]
        for layer, error in zip(self.layers, self.invariant_errors()):
            shape = "x".join(map(str, layer.shape))
            lines.append(f"{layer.name.removeprefix('base_model.model.'):<52} {shape:>12} {layer.rank:>4} "
                         f"{layer.seconds:>9.4f} {layer.relative(layer.delta_norm):>10.3g} {error:>10.3g}")
        return "\n".join(lines)


def _layer_seed(seed: int, index: int) -> int:
    """Layer ``index``'s generator seed (the loss benchmark's, so its runs replay here)."""
    return (seed * 1_000_003 + index) % (2**63)


def _check_targets(spec: InitializerSpec, found: list[Target], adapter: str) -> None:
    for target in found:
        problem = spec.rank_problem(*target.shape, target.rank)
        if problem is not None:
            raise ValueError(f"{spec.name} cannot initialize {target.name} ({target.shape[0]}x{target.shape[1]}) at "
                             f"rank {target.rank}: {problem}; change r (or rank_pattern) in the LoraConfig")
        initial = getattr(target.layer, "loram_initial", {}).get(adapter)
        if initial is not None and initial.invariant.rewrites_weight:
            raise ValueError(f"adapter {adapter!r} was initialized with {initial.method}, which rewrote the base "
                             f"weights ({target.name}); initialize a fresh model instead")
        if parametrize.is_parametrized(target.layer.lora_A[adapter], "weight"):
            raise ValueError(f"{target.name}: lora_A of {adapter!r} carries a parametrization (a LoRA-SB R); "
                             "initialize a fresh model instead")
        if is_distributed(target.base.weight) and target.transposed:
            raise ValueError(f"{target.name}: a sharded weight stored transposed (fan_in_fan_out) is not supported")


def collect_statistics(model, method: str, data: Any, *, adapter_name: str = "default", batch_size: int = 8,
                       lr: float | None = None, num_train: int | None = None, warmup_ratio: float = 0.02,
                       loss_fn: LossFn | None = None, max_samples: int | None = None,
                       progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``method``'s layer statistics over ``data``: ``({layer name: stats}, meta)``.

    One pass with the adapter disabled, accumulating the sums the method's statistics kind
    reads (``StatisticsKind.needs``) on each LoRA layer's base layer, then the kind's own
    derivation (``from_moments``). ``lr`` is the training learning rate (LoRA-SB's η follows
    it: required there); ``num_train`` the training set's size (LoRA-DA's variance term and
    LoRA-SB's batches per epoch; default: the samples the pass read).
    """
    spec = get_initializer(method)
    kind = spec.statistics
    if not kind.needed:
        return {}, {}
    if data is None:
        raise ValueError(f"{method} needs data: pass data= (a tensor of token ids, an iterable of batches or a "
                         f"callable returning one) for its {kind.label}")
    if kind.lr_rescale is not None and lr is None:
        raise ValueError(f"{method} needs lr= (the training learning rate): its statistics follow it (LoRA-SB: "
                         "η = lr / (warmup_ratio · batches per epoch), docs/initializers.md §3)")
    found = targets(model, adapter_name)
    layers = {t.name: t.base for t in found}
    on_batch = (lambda samples: print(f"\r{method}: statistics pass, {samples} samples", end="", file=sys.stderr,
                                      flush=True)) if progress else None
    t0 = time.perf_counter()
    with model.disable_adapter():
        sums = collect_moments_from(model, steps(model, data, batch_size=batch_size, loss_fn=loss_fn), layers,
                                    kind.needs, max_samples=max_samples, on_batch=on_batch)
    if progress:
        print(file=sys.stderr)
    samples = next(iter(sums.values())).samples
    ctx = CollectContext(batch_size=batch_size, lr=lr if lr is not None else 0.0, num_train=num_train or samples,
                         warmup_ratio=warmup_ratio)
    stats, meta = derive(kind, sums, ctx)
    return stats, {**meta, "pass_seconds": time.perf_counter() - t0, "kind": kind.name}


def _kwargs(spec: InitializerSpec, options: dict[str, Any], target: Target, index: int, seed: int,
            stats: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(options)
    if spec.needs_statistics:
        if stats is None or target.name not in stats:
            raise ValueError(f"{spec.name} needs layer statistics; none for {target.name} (pass data= or stats=)")
        kwargs["stats"] = stats[target.name]
    weight = target.base.weight
    device = weight.device if not is_distributed(weight) else weight.to_local().device
    generator = (torch.Generator(device=device).manual_seed(_layer_seed(seed, index))
                 if "generator" in spec.harness else None)
    module = None if spec.harness.get("module") in kwargs else target.module
    kwargs.update(spec.harness_kwargs(generator=generator, module=module))
    return kwargs


def _run_sharded(spec: InitializerSpec, target: Target, kwargs: dict[str, Any]):
    """The sharded initializer of ``spec.name`` (or the gather baseline) on the DTensor weight:
    (result, placement, bytes this rank sent)."""
    from ..sharded import SHARDED, Collectives, Ledger
    from ..sharded.pissa import gathered_init

    weight = target.base.weight.detach()
    ledger = Ledger()
    comm = Collectives(weight.device_mesh.get_group(), ledger)
    sharded = SHARDED.get(spec.name)
    if sharded is not None and not sharded.gathers_weight:
        accepted = inspect.signature(sharded.fn).parameters
        dropped = [k for k in kwargs if k not in accepted and k not in ("check_input", "module")]
        if dropped:
            raise ValueError(f"the sharded {spec.name} does not take {', '.join(dropped)}; drop the option(s) on a "
                             "sharded model")
        out = sharded.fn(weight, target.rank, target.scaling, comm=comm,
                         **{k: v for k, v in kwargs.items() if k in accepted})
        return out, "sharded", ledger
    return gathered_init(spec.name, weight, target.rank, target.scaling, comm, **kwargs), "gathered", ledger


def _reducer(target: Target):
    import torch.distributed as dist

    group = target.base.weight.device_mesh.get_group()

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(sums, group=group)
        return sums

    return reduce


def _local_factors(target: Target, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of B (row-sharded W) or columns of A (column-sharded W) this rank's block of W uses."""
    from ..sharded.layout import layout_of

    lay = layout_of(target.base.weight)
    return (lay.block(b, 0), a) if lay.dim == 0 else (b, lay.block(a, 1))


def _init_layer(spec: InitializerSpec, target: Target, adapter: str, kwargs: dict[str, Any], verify: bool
                ) -> LayerReport:
    distributed = is_distributed(target.base.weight)
    weight = target.weight()
    rewrites = spec.invariant.rewrites_weight
    # the weight before, to check the residual and to put back if a write fails: a reference
    # while the write gives the parameter the residual's storage, a copy where it overwrites
    original = (weight.to_local() if distributed else weight) if rewrites else None
    placement, ledger = "whole", None
    t0 = time.perf_counter()
    if distributed:
        init, placement, ledger = _run_sharded(spec, target, kwargs)
    else:
        init = spec.fn(weight, target.rank, target.scaling, **kwargs)
    seconds = time.perf_counter() - t0
    lora_a, lora_b = target.layer.lora_A[adapter], target.layer.lora_B[adapter]
    if original is not None and (init.residual is None or not rebinds(target, init.residual)):
        original = original.clone()
    try:
        write(lora_a.weight, init.A)
        write(lora_b.weight, init.B)
        if init.residual is not None:
            write_weight(target, init.residual)
    except BaseException:
        if original is not None:  # the base weight as it was: a failed write leaves no half-rewritten layer
            if distributed:
                target.base.weight.to_local().copy_(original.mT if target.transposed else original)
            else:
                write_weight(target, original)
        raise
    a0, b0 = full_value(lora_a.weight.detach()).clone(), full_value(lora_b.weight.detach()).clone()
    r = getattr(init, "R", None)
    for label, factor in (("A", lora_a), ("B", lora_b)):  # what the registry says trains (MiCA: A only)
        if label not in spec.trains:
            factor.weight.requires_grad_(False)
    if r is not None:
        lora_a.weight.requires_grad_(False)
        lora_b.weight.requires_grad_(False)
        parametrize.register_parametrization(lora_a, "weight", LeftMultiply(r.to(lora_a.weight.dtype)), unsafe=True)
        lora_a.parametrizations.weight.original.requires_grad_(False)
    if not hasattr(target.layer, "loram_initial"):
        target.layer.loram_initial = {}
    target.layer.loram_initial[adapter] = Initial(spec.name, spec.invariant, a0, b0, target.scaling)
    b_eff = b0 @ r.to(b0.dtype) if r is not None else b0
    norms = Norms(0.0, 0.0, 0.0, 0.0)
    if verify:
        local = target.weight().to_local() if distributed else target.weight()
        before = original if rewrites else local
        bl, al = _local_factors(target, b_eff, a0) if distributed else (b_eff, a0)
        norms = layer_norms(before, local if rewrites else None, bl, al, target.scaling,
                            reduce=_reducer(target) if distributed else None)
    eps = max(float(torch.finfo(t.dtype).eps) for t in (target.base.weight, a0, b0) if t.dtype.is_floating_point)
    bound = target.scaling * float(b_eff.double().norm()) * float(a0.double().norm()) if verify else 0.0
    info = {k: v for k, v in init.info.items() if isinstance(v, (int, float, str, bool))}
    return LayerReport(name=target.name, shape=target.shape, rank=target.rank, scaling=target.scaling,
                       seconds=seconds, w_norm=norms.w_norm, delta_norm=norms.delta_norm,
                       output_shift=norms.output_shift, weight_shift=norms.weight_shift, factors_bound=abs(bound),
                       eps=eps, info=info,
                       placement=placement, bytes_sent=ledger.bytes_sent if ledger is not None else 0)


def initialize(model, method: str, *, adapter_name: str = "default", data: Any = None, seed: int = 0,
               stats: dict[str, Any] | None = None, batch_size: int = 8, lr: float | None = None,
               num_train: int | None = None, warmup_ratio: float = 0.02, loss_fn: LossFn | None = None,
               max_samples: int | None = None, verify: bool = True, progress: bool | Callable[[str], None] = False,
               options: dict[str, Any] | None = None, **more_options: Any) -> InitReport:
    """Initialize ``model``'s LoRA adapter ``adapter_name`` with the registered initializer
    ``method``, in place (the module docstring); returns an :class:`InitReport`.

    Args:
        model: a ``peft.PeftModel`` with a LoRA adapter of linear layers.
        method: a registered initializer's name (``loram-bench list``).
        data: the data-aware methods' statistics data (``loram_ref.peft.data``); ignored by
            the others.
        seed: seeds each layer's generator (layer i: ``seed·1000003 + i``), for the methods
            that draw random numbers.
        stats: ``{layer name: statistics}`` collected beforehand (:func:`collect_statistics`),
            instead of ``data``.
        batch_size, lr, num_train, warmup_ratio, loss_fn, max_samples: the statistics pass
            (:func:`collect_statistics`).
        verify: measure each layer's invariant (``loram_ref.peft.checks``); False skips the
            checks.
        progress: True prints one line per layer to stderr; a callable receives each line.
        more_options: the initializer's own keywords (``niter=8`` for ``pissa_rsvd``,
            ``mode="kpm"`` for ``corda``; ``loram-bench list`` and each function's docstring
            name them); ``options`` takes them as a dict, for one named like a parameter of
            ``initialize`` (an initializer's own ``seed``).
    """
    options = {**(options or {}), **more_options}
    spec = get_initializer(method)
    found = targets(model, adapter_name)
    _check_targets(spec, found, adapter_name)
    say = progress if callable(progress) else ((lambda line: print(line, file=sys.stderr, flush=True))
                                              if progress else None)
    t0 = time.perf_counter()
    stats_seconds, stats_samples = 0.0, 0
    if spec.needs_statistics and stats is None:
        if any(is_distributed(t.base.weight) for t in found):
            raise ValueError(f"{method} needs statistics, and their pass does not run on a sharded model: collect "
                             "them with loram_ref.peft.collect_statistics on an unsharded copy of the model (or on "
                             "each rank before fully_shard) and pass stats=")
        stats, meta = collect_statistics(model, method, data, adapter_name=adapter_name, batch_size=batch_size, lr=lr,
                                         num_train=num_train, warmup_ratio=warmup_ratio, loss_fn=loss_fn,
                                         max_samples=max_samples, progress=bool(progress))
        stats_seconds, stats_samples = meta["pass_seconds"], meta["samples"]
    if "R" in spec.trains and any(is_distributed(t.base.weight) for t in found):
        raise ValueError(f"{method} on a sharded model: its trainable R is a parametrization of lora_A, which "
                         "FSDP2's sharded parameters do not take; initialize before sharding")
    reports = []
    for index, target in enumerate(found):
        kwargs = _kwargs(spec, options, target, index, seed, stats)
        report = _init_layer(spec, target, adapter_name, kwargs, verify)
        reports.append(report)
        if say is not None:
            say(f"[{index + 1}/{len(found)}] {target.module} {target.shape[0]}x{target.shape[1]} r={target.rank}: "
                f"{report.seconds:.3f} s ({report.placement})")
    return InitReport(method=spec.name, adapter=adapter_name, invariant=spec.invariant, layers=tuple(reports),
                      seconds=time.perf_counter() - t0, stats_seconds=stats_seconds, stats_samples=stats_samples,
                      verified=verify)
