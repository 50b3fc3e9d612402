"""The models the adoption benchmark loads, by a name a child process can be given: a local
Hugging Face causal-LM folder, or ``"tiny"`` (a random two-layer Llama made from a seed,
for tests: no files)."""

from __future__ import annotations

from pathlib import Path

import torch

#: The tiny model's vocabulary (its token ids are drawn below it).
TINY_VOCAB = 64


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random two-layer Llama (hidden 32, MLP 64, 4 heads, 2 KV heads), the same for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """``"tiny"`` or a local model folder (never downloaded), in eval mode."""
    if name == "tiny":
        return tiny_llama(dtype=dtype)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r}: neither 'tiny' nor a Hugging Face model folder (no config.json)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).eval()


def vocab_size(model) -> int:
    return int(model.config.vocab_size)


def token_ids(model, count: int, length: int, seed: int = 1) -> torch.Tensor:
    """Seeded random token ids: the same data on every rank and in every process."""
    return torch.randint(0, vocab_size(model), (count, length), generator=torch.Generator().manual_seed(seed))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks FSDP2 shards one by one (``model.model.layers`` in a Llama-style model)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to shard block by block")
    return list(layers)


def train_steps(model, ids: torch.Tensor, steps: int, lr: float, batch_size: int = 2) -> None:
    """``steps`` AdamW steps on consecutive batches of ``ids`` (wrapping around), over the
    parameters that train; the model is left in eval mode. The adapter moves, so what is
    checked after it is a trained adapter, not its initialization."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        batch = ids[(batch_size * step) % len(ids):][:batch_size]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
