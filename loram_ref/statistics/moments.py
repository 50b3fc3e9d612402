"""One statistics pass for every data-aware initializer: per targeted layer, the sums each
kind's statistics are made of, accumulated once over the training blocks.

What a kind needs is a set of these sums (``StatisticsKind.needs``):

* ``"grad"``: ``Σ_j ∇_W L_j`` (m x n), ``L_j`` sample j's mean token loss. LoRA-SB takes
  its sign, LoRA-GA, LoRA-One and LoRA-DA divide it by N (the mean gradient G).
* ``"input"``: ``Σ_t x_t x_tᵀ`` (n x n) and ``Σ_t x_t`` over the layer's input tokens.
  LoRA-DA's K-FAC input factor ``Z`` and EVA's moments.
* ``"input_peak"``: ``Σ_j X̃_jᵀ X̃_j`` with ``X̃_j = X_j / |max X_j|``: CorDA's covariance as
  PEFT's ``preprocess_corda`` builds it (each sample's activations divided by their largest
  value; docs/initializers.md §6).
* ``"output"``: ``Σ_t (∂L_j/∂y_t)²`` (m): LoRA-DA's diagonal output factor.

Blocks run in batches; the batch's loss (the mean over its tokens, which for blocks of one
length is ``(1/B) Σ_j L_j``) is multiplied by B before the backward pass, so every sum is
over samples exactly as at batch size 1. A pass with neither ``"grad"`` nor ``"output"``
runs forward only. ``checkpoints`` are sample counts at which the sums are copied out: a
kind that reads its first N_k blocks gets exactly what a pass over those N_k blocks alone
would give (up to summation order), whatever other kinds share the pass (tested).

:func:`collect_moments_from` runs the same pass over any iterable of batches (a user's own
data loader: tensors of token ids, or mappings for the model's forward with an
``attention_mask``); tokens the mask leaves out are left out of every input sum.

The pass leaves the model as it found it: each parameter's ``requires_grad`` is restored
and the gradients it made are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import torch

#: The sums a kind can ask for (see the module docstring).
NEEDS = ("grad", "input", "input_peak", "output")


@dataclass
class LayerMoments:
    """One layer's sums over the first ``samples`` samples (``tokens`` input tokens)."""

    samples: int = 0
    tokens: int = 0
    grad_sum: torch.Tensor | None = None
    input_sq: torch.Tensor | None = None
    input_sum: torch.Tensor | None = None
    input_peak_sq: torch.Tensor | None = None
    output_sq: torch.Tensor | None = None

    def copy(self) -> "LayerMoments":
        return replace(self, **{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                for k, v in self.__dict__.items()})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"the statistics pass did not collect {', '.join(missing)}; the kind must list what it "
                             "reads in its needs")


def check_needs(needs: Iterable[str]) -> frozenset[str]:
    needs = frozenset(needs)
    unknown = needs - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown statistics need(s) {sorted(unknown)}; known: {', '.join(NEEDS)}")
    return needs


@dataclass
class _Accumulators:
    layers: dict[str, torch.nn.Linear]
    needs: frozenset[str]
    device: torch.device
    sums: dict[str, LayerMoments] = field(default_factory=dict)
    #: the current batch's token mask (batch x tokens, True where a token counts), or None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for key, module in self.layers.items():
            m, n = module.out_features, module.in_features
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.device)  # noqa: E731
            self.sums[key] = LayerMoments(
                grad_sum=zeros(m, n) if "grad" in self.needs else None,
                input_sq=zeros(n, n) if "input" in self.needs else None,
                input_sum=zeros(n) if "input" in self.needs else None,
                input_peak_sq=zeros(n, n) if "input_peak" in self.needs else None,
                output_sq=zeros(m) if "output" in self.needs else None,
            )

    def _kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask as a (batch, tokens, 1) float factor when it applies to ``x``; else None."""
        if self.mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(self.mask.shape):
            return None
        return self.mask.to(device=x.device, dtype=x.dtype)[..., None]

    def forward_hook(self, key: str) -> Callable:
        sums = self.sums[key]

        def output_grad_hook(g: torch.Tensor) -> None:
            sums.output_sq.add_(g.detach().reshape(-1, g.shape[-1]).float().square().sum(0))

        def hook(_module, inputs, output) -> None:
            x = inputs[0].detach().float()
            kept = self._kept(x)
            if kept is not None:
                x = x * kept  # left-out tokens add nothing to any sum
            flat = x.reshape(-1, x.shape[-1])
            sums.tokens += flat.shape[0] if kept is None else int(kept.sum())
            if sums.input_sq is not None:
                sums.input_sq.addmm_(flat.mT, flat)
                sums.input_sum.add_(flat.sum(0))
            if sums.input_peak_sq is not None:
                per_sample = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x[None]
                peaks = per_sample.amax(dim=(1, 2)).abs()
                if bool((peaks == 0).any()):
                    raise ValueError(f"{key}: a sample's inputs are all <= 0 with maximum 0; CorDA's covariance "
                                     "divides each sample by its largest input")
                scaled = (per_sample / peaks[:, None, None]).reshape(-1, x.shape[-1])
                sums.input_peak_sq.addmm_(scaled.mT, scaled)
            if sums.output_sq is not None and output.requires_grad:
                output.register_hook(output_grad_hook)

        return hook


class _Pass:
    """The hooks and the gradient switches of one pass, undone on exit: every parameter's
    ``requires_grad`` as it was, no gradient left behind, no hook left registered."""

    def __init__(self, model, layers: dict[str, torch.nn.Linear], needs: frozenset[str]) -> None:
        self.model, self.layers, self.needs = model, layers, needs
        self.backward = bool(needs & {"grad", "output"})
        self.acc = _Accumulators(layers, needs, next(model.parameters()).device)

    def __enter__(self) -> "_Pass":
        self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        if self.backward:
            for module in self.layers.values():
                module.weight.requires_grad_(True)
        self._handles = [module.register_forward_hook(self.acc.forward_hook(key))
                         for key, module in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.model.zero_grad(set_to_none=True)
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)

    def step(self, loss: Callable[[], torch.Tensor], size: int, mask: torch.Tensor | None = None) -> None:
        """One batch of ``size`` samples: ``loss()`` is its mean loss (the module docstring)."""
        self.acc.mask = mask
        try:
            if self.backward:
                self.model.zero_grad(set_to_none=True)
                (loss() * size).backward()  # Σ_j L_j (module docstring)
                if "grad" in self.needs:
                    for key, module in self.layers.items():
                        self.acc.sums[key].grad_sum.add_(module.weight.grad.float())
            else:
                with torch.no_grad():
                    loss()
        finally:
            self.acc.mask = None
        for sums in self.acc.sums.values():
            sums.samples += size


def collect_moments(model, blocks: torch.Tensor, layers: dict[str, torch.nn.Linear], needs: Iterable[str], *,
                    batch_size: int, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                    checkpoints: Iterable[int] | None = None) -> dict[int, dict[str, LayerMoments]]:
    """One pass over ``blocks`` (samples x tokens) accumulating ``needs`` for every layer of
    ``layers``; returns ``{N: {layer: LayerMoments over the first N samples}}`` for each N of
    ``checkpoints`` (default: all the blocks)."""
    needs = check_needs(needs)
    total = len(blocks)
    marks = sorted({int(c) for c in (checkpoints or [total])})
    if not marks or marks[0] < 1 or marks[-1] > total:
        raise ValueError(f"checkpoints must be sample counts in 1..{total} (the blocks given), got {marks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: dict[int, dict[str, LayerMoments]] = {}
    with _Pass(model, layers, needs) as run:
        start = 0
        for mark in marks:
            while start < mark:
                ids = blocks[start:min(start + batch_size, mark)]
                run.step(lambda: loss_fn(model, ids), ids.shape[0])
                start += ids.shape[0]
            out[mark] = {k: (v if mark == marks[-1] else v.copy()) for k, v in run.acc.sums.items()}
    return out


#: ``(loss(), samples, token mask or None)`` per batch, for :func:`collect_moments_from`
BatchStep = tuple[Callable[[], torch.Tensor], int, torch.Tensor | None]


def collect_moments_from(model, steps: Iterator[BatchStep] | Iterable[BatchStep], layers: dict[str, torch.nn.Linear],
                         needs: Iterable[str], *, max_samples: int | None = None,
                         on_batch: Callable[[int], None] | None = None) -> dict[str, LayerMoments]:
    """The same pass over a user's batches: each item of ``steps`` gives its mean loss (a
    callable), its sample count and its token mask; the pass stops after ``max_samples``
    samples (the batch that crosses it counts whole). ``on_batch(samples so far)`` reports
    progress. Returns ``{layer: LayerMoments}``."""
    needs = check_needs(needs)
    with _Pass(model, layers, needs) as run:
        seen = 0
        for loss, size, mask in steps:
            if size < 1:
                raise ValueError("a batch of the data holds no samples")
            run.step(loss, size, mask)
            seen += size
            if on_batch is not None:
                on_batch(seen)
            if max_samples is not None and seen >= max_samples:
                break
        if seen == 0:
            raise ValueError("the data gave no batches: the statistics pass needs at least one")
        return run.acc.sums
