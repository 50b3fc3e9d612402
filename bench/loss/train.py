"""One short LoRA run: the same model, data, seed and batch order for every initializer."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bench.loss.apply import snapshot_factors, update_norm
from bench.loss.data import Blocks


@dataclass
class Curve:
    """Per-step records of one run. ``eval_loss[i]`` is NaN where no eval ran."""

    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    update_norm: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    eval_loss_step0: float = math.nan
    diverged_step: int = 0  # the first step whose train loss was not finite (0: none)
    final_eval_blocks: list[float] = field(default_factory=list)  # the last eval's loss per held-out block
    lr_at_step: list[float] = field(default_factory=list)  # the lr each step used (the schedule)

    def eval_auc(self) -> float:
        """The area under the eval-loss curve over steps 0..T (trapezoids between the steps
        that were evaluated), divided by T: the run's time-averaged eval loss. Lower means it
        got low sooner (a convergence-speed measure that the final loss alone misses)."""
        points = [(0, self.eval_loss_step0)] + [(i + 1, v) for i, v in enumerate(self.eval_loss) if not math.isnan(v)]
        if len(points) < 2 or math.isnan(points[0][1]):
            return math.nan
        area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
        return area / points[-1][0]


def autocast_context(device: str, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None.

    Mixed precision as usual: matmuls in bf16, the trainable LoRA factors, their gradients,
    AdamW's state, the norms and the loss stay in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def eval_block_losses(model, blocks: torch.Tensor, batch_size: int, autocast: torch.dtype | None = None) -> list[float]:
    """The mean next-token loss of each held-out block (cross-entropy in float32 over its
    ``seq_len − 1`` predicted tokens, as the model's own loss computes it)."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    with autocast_context(str(blocks.device), autocast):
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size]
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="none")
            out.extend(loss.view(len(ids), -1).mean(1).tolist())
    model.train(was_training)
    return out


def eval_loss(model, blocks: torch.Tensor, batch_size: int, autocast: torch.dtype | None = None) -> float:
    """Mean token loss over the held-out blocks (equal-length blocks: the mean of the blocks' means)."""
    losses = eval_block_losses(model, blocks, batch_size, autocast)
    return sum(losses) / len(losses)


#: ``--schedule``: warmup then linear decay to 0 (Hugging Face's default), warmup then cosine, or a constant lr.
SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """The lr multiplier of 1-based ``step``: ``step/warmup`` during the warmup, then the
    decay from 1 at the warmup's end to 0 after the last step (``constant``: 1 after the warmup)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps and step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup_steps)
    progress = (step - warmup_steps - 1) / span  # 0 at the first step after the warmup
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def train(
    model,
    blocks: Blocks,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    device: str,
    autocast: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
    warmup_steps: int = 0,
    schedule: str = "constant",
) -> Curve:
    """AdamW (no weight decay) on the trainable parameters for ``steps`` steps, the lr of
    step ``i`` being ``lr · lr_factor(i)`` (``warmup_steps`` of linear warmup, then
    ``schedule``).

    Step ``i`` (1-based) trains on ``blocks.batch(i - 1)``; the update magnitude after the
    step is ``Σ_layers ‖W_eff(i) - W_eff(0)‖_F`` (the LoRAM paper's magnitude argument).
    Eval runs at step 0, every ``eval_every`` steps and after the last (the last eval's
    per-block losses are kept: the eval set's sampling error). A non-finite train
    loss ends the run there: ``curve.diverged_step`` names the step, and the run's summary
    says it diverged (the verdict counts such runs apart instead of averaging NaN).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = snapshot_factors(model)
    curve = Curve()
    eval_blocks = blocks.eval.to(device)
    curve.eval_loss_step0 = eval_loss(model, eval_blocks, batch_size, autocast)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        current = lr * lr_factor(step, steps, warmup_steps, schedule)
        for group in optimizer.param_groups:
            group["lr"] = current
        curve.lr_at_step.append(current)
        ids = blocks.batch(step - 1, batch_size).to(device)
        with autocast_context(device, autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            curve.diverged_step = step
            break
        curve.step_seconds.append(time.perf_counter() - t0)
        curve.train_loss.append(value)
        curve.update_norm.append(update_norm(model, start))
        if step % eval_every == 0 or step == steps:
            per_block = eval_block_losses(model, eval_blocks, batch_size, autocast)
            curve.eval_loss.append(sum(per_block) / len(per_block))
            curve.final_eval_blocks = per_block
        else:
            curve.eval_loss.append(math.nan)
        if on_step is not None:
            on_step(step, value)
    return curve
