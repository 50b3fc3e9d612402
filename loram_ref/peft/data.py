"""What ``initialize(data=...)`` accepts, as the batches of the shared statistics pass.

``data`` is one of:

* a 2-D tensor of token ids (samples x tokens): cut into batches of ``batch_size``;
* an iterable of batches, each a tensor of token ids or a mapping of the model's forward
  arguments (``input_ids``, and optionally ``attention_mask`` and ``labels``; a
  ``transformers`` data collator's output is one);
* a callable taking no arguments that returns such an iterable (a fresh loader).

A batch's loss is the model's own (``labels``, or the input ids with the tokens the
attention mask leaves out set to -100), unless ``loss_fn(model, batch)`` is given; the
pass multiplies it by the batch's size, so for samples of one length every sum is over
samples (``loram_ref.statistics.moments``). Tokens the attention mask leaves out are left
out of every input sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch

from ..statistics.moments import BatchStep

#: ``loss_fn(model, batch) -> scalar``, the batch as it came from ``data`` (moved to the model's device)
LossFn = Callable[[Any, Any], torch.Tensor]


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _model_loss(model, batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, labels=batch).loss
    if "labels" in batch:
        return model(**batch).loss
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return model(**batch, labels=labels).loss


def _checked(batch: Any, index: int) -> tuple[int, torch.Tensor | None]:
    """The batch's size and token mask; a clear error for anything that is not a batch."""
    if isinstance(batch, torch.Tensor):
        ids = batch
        mask = None
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"data: batch {index} is a mapping without 'input_ids' (it has "
                             f"{', '.join(map(str, batch)) or 'no keys'}); give the model's forward arguments")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(f"data: batch {index} is a {type(batch).__name__}; each batch must be a tensor of token ids "
                        "or a mapping with 'input_ids' (and optionally 'attention_mask', 'labels')")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"data: batch {index}'s input_ids must be a 2-D integer tensor (batch x tokens), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"data: batch {index}'s attention_mask has shape {tuple(mask.shape)}, its input_ids "
                         f"{tuple(ids.shape)}")
    return int(ids.shape[0]), (None if mask is None else mask.bool())


def batches(data: Any, batch_size: int) -> Iterable[Any]:
    """``data`` as an iterable of batches (the module docstring)."""
    if callable(data) and not isinstance(data, (torch.Tensor, Mapping)) and not hasattr(data, "__iter__"):
        data = data()
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype.is_floating_point:
            raise ValueError(f"data: a tensor must hold token ids as a 2-D integer tensor (samples x tokens), got "
                             f"{data.dtype} of shape {tuple(data.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    if isinstance(data, (Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a 2-D tensor of token ids, an iterable of batches or a callable returning "
                        f"one, got {type(data).__name__}")
    return data


def steps(model, data: Any, *, batch_size: int, loss_fn: LossFn | None = None) -> Iterator[BatchStep]:
    """The statistics pass's steps over ``data``: ``(loss(), samples, token mask)`` per batch."""
    device = next(model.parameters()).device
    loss = loss_fn or _model_loss
    for index, batch in enumerate(batches(data, batch_size)):
        size, mask = _checked(batch, index)
        moved = _to(batch, device)
        yield (lambda b=moved: loss(model, b)), size, mask
