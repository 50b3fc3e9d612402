"""One short LoRA run: the same model, data, seed and batch order for every initializer."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .apply import snapshot_factors, update_norm
from .data import Blocks


@dataclass
class Curve:
    """Per-step records of one run. ``eval_loss[i]`` is NaN where no eval ran."""

    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    update_norm: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    eval_loss_step0: float = math.nan


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean token loss over the held-out blocks (equal-length blocks: a plain mean)."""
    was_training = model.training
    model.eval()
    losses = [float(model(input_ids=blocks[i : i + batch_size], labels=blocks[i : i + batch_size]).loss)
              for i in range(0, len(blocks), batch_size)]
    model.train(was_training)
    weights = [min(batch_size, len(blocks) - i) for i in range(0, len(blocks), batch_size)]
    return sum(l * w for l, w in zip(losses, weights)) / sum(weights)


def train(
    model,
    blocks: Blocks,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    device: str,
    on_step: Callable[[int, float], None] | None = None,
) -> Curve:
    """AdamW (no weight decay, constant lr) on the trainable parameters for ``steps`` steps.

    Step ``i`` (1-based) trains on ``blocks.batch(i - 1)``; the update magnitude after the
    step is ``Σ_layers ‖W_eff(i) - W_eff(0)‖_F`` (the LoRAM paper's magnitude argument).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = snapshot_factors(model)
    curve = Curve()
    eval_blocks = blocks.eval.to(device)
    curve.eval_loss_step0 = eval_loss(model, eval_blocks, batch_size)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        ids = blocks.batch(step - 1, batch_size).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        curve.step_seconds.append(time.perf_counter() - t0)
        curve.train_loss.append(value)
        curve.update_norm.append(update_norm(model, start))
        curve.eval_loss.append(eval_loss(model, eval_blocks, batch_size) if step % eval_every == 0 or step == steps else math.nan)
        if on_step is not None:
            on_step(step, value)
    return curve
