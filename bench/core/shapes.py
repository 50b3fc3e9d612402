"""Shape catalog: the linear-layer shapes of a model and how often each occurs.

Shapes come from a transformers config by instantiating the model on the meta device
(no weights are allocated or downloaded), so any local ``config.json`` or model folder
works. Built-in presets are configs of well-known models, embedded here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Bytes per element of each weight dtype the benchmarks measure.
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

#: Layer names left out by default: the LM head and embeddings are not LoRA targets here.
EXCLUDED = ("lm_head",)


@dataclass(frozen=True, order=True)
class LayerShape:
    """One linear-layer shape of a model. ``d_out x d_in`` is ``nn.Linear.weight.shape``."""

    role: str  # the module's own name, e.g. "q_proj"
    d_out: int
    d_in: int
    count: int = 1

    @property
    def key(self) -> str:
        return f"{self.d_out}x{self.d_in}"

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _llama(hidden, inter, layers, heads, kv_heads, vocab, **extra) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        **extra,
    }


#: Built-in presets: the architecture fields of each model's public ``config.json``.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 32000),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "mistral-7b": {**_llama(4096, 14336, 32, 32, 8, 32000), "model_type": "mistral"},
    "qwen2.5-7b": {**_llama(3584, 18944, 28, 28, 4, 152064), "model_type": "qwen2"},
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256),
}


def load_config(source: str | Path | dict[str, Any]):
    """A transformers ``PretrainedConfig`` from a preset name, a config dict, a
    ``config.json`` path or a model folder. Never touches the network.

    Raises ``ValueError`` naming the source for anything that is not a usable config: a
    missing file, a file that is not JSON, a ``model_type`` transformers does not know.
    """
    from transformers import AutoConfig

    if isinstance(source, dict):
        return _config_from_fields(source, "config")
    if str(source) in PRESETS:
        return _config_from_fields(PRESETS[str(source)], str(source))
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join(sorted(PRESETS))
        if path.parent.is_dir() and path.name == "config.json" and Path(source).is_dir():
            raise ValueError(f"{source} is a folder without config.json: give a model folder holding one, a config.json "
                             f"path or a preset ({known})")
        raise ValueError(f"unknown shape preset or config path {str(source)!r}; presets: {known}")
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON config ({exc}); pass a transformers config.json or a preset") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} holds a JSON {type(fields).__name__}, not a config object")
    _check_model_type(fields, str(path))
    check_config_fields(fields, str(path))
    if path.name == "config.json":
        try:
            return AutoConfig.from_pretrained(path.parent, local_files_only=True)
        except (TypeError, ValueError, OSError) as exc:
            raise ValueError(f"{path}: transformers cannot read this config ({str(exc).splitlines()[0][:200]})") from None
    return _config_from_fields(fields, str(path))


def _check_model_type(fields: dict[str, Any], source: str) -> str:
    from transformers import CONFIG_MAPPING

    model_type = fields.get("model_type")
    if not model_type:
        raise ValueError(f"{source}: the config has no model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{source}: model_type {model_type!r} is not known to this transformers; "
                         "use a causal-LM config (llama, mistral, qwen2, ...) or upgrade transformers")
    return model_type


#: Size fields of a config that must be positive integers where present.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner")
#: The most layers a config may have: no causal LM has more than a few hundred, and
#: building one this deep on the meta device already takes seconds.
MAX_LAYERS = 1000


def check_config_fields(fields: dict[str, Any], source: str) -> None:
    """The size fields of a config are positive integers, the layer count is at most
    :data:`MAX_LAYERS`, the hidden size splits into the heads, and the architecture (where
    named) is a causal LM: an error naming ``source`` and the field otherwise, before
    transformers builds anything."""
    for name in SIZE_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    for name in ("num_hidden_layers", "n_layer"):
        if (fields.get(name) or 0) > MAX_LAYERS:
            raise ValueError(f"{source}: field {name!r} is {fields[name]:,}, more layers than any causal LM has (at most "
                             f"{MAX_LAYERS}); fix the config")
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    if hidden and heads and not fields.get("head_dim") and hidden % heads:
        raise ValueError(f"{source}: hidden_size {hidden} does not split into num_attention_heads {heads} "
                         "(give head_dim, or fix the config)")
    kv = fields.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    architectures = fields.get("architectures")
    if architectures is not None:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ValueError(f"{source}: field 'architectures' must be a list of class names, got {architectures!r}")
        if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            raise ValueError(f"{source}: architectures {', '.join(architectures)} is not a causal LM (no ...ForCausalLM); "
                             "loram-bench measures the linear layers of causal LMs")
    if fields.get("is_encoder_decoder"):
        raise ValueError(f"{source}: an encoder-decoder config; loram-bench measures causal LMs")


def _config_from_fields(fields: dict[str, Any], source: str):
    from transformers import CONFIG_MAPPING

    fields = dict(fields)
    model_type = _check_model_type(fields, source)
    check_config_fields(fields, source)
    fields.pop("model_type")
    try:
        return CONFIG_MAPPING[model_type](**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: transformers cannot read this config ({str(exc).splitlines()[0][:200]})") from None


def shapes_from_config(config, exclude: tuple[str, ...] = EXCLUDED) -> list[LayerShape]:
    """Count every ``nn.Linear`` shape of the causal LM built from ``config`` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ValueError(f"model_type {config.model_type!r} is an encoder (masked LM) unless is_decoder is set; "
                         "loram-bench measures causal LMs")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ValueError(f"model_type {config.model_type!r} has no causal-LM class in transformers (an encoder-decoder "
                         "or encoder model?); loram-bench measures causal LMs") from None
    counts: Counter[tuple[str, int, int]] = Counter()
    for name, module in model.named_modules():
        role = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and role not in exclude:
            d_out, d_in = module.weight.shape
            counts[(role, d_out, d_in)] += 1
    return [LayerShape(role, d_out, d_in, n) for (role, d_out, d_in), n in sorted(counts.items(), key=_order)]


_ROLE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _order(item):
    (role, d_out, d_in), _ = item
    return (_ROLE_ORDER.index(role) if role in _ROLE_ORDER else len(_ROLE_ORDER), role, d_out, d_in)


def model_shapes(source: str | Path | dict[str, Any]) -> list[LayerShape]:
    """Shapes of a preset, config file or model folder."""
    return shapes_from_config(load_config(source))


def unique_shapes(shapes: list[LayerShape]) -> list[LayerShape]:
    """Merge roles that share a ``d_out x d_in`` (q and o, gate and up): one measurement
    serves both, and ``count`` adds up. The role lists every merged name."""
    merged: dict[tuple[int, int], LayerShape] = {}
    for s in shapes:
        prev = merged.get((s.d_out, s.d_in))
        merged[(s.d_out, s.d_in)] = (
            s if prev is None else LayerShape(f"{prev.role}+{s.role}", s.d_out, s.d_in, prev.count + s.count)
        )
    return sorted(merged.values(), key=lambda s: (s.numel, s.d_out))


def format_table(name: str, shapes: list[LayerShape]) -> str:
    """Plain-text table of a model's shapes with parameter totals."""
    lines = [f"{name}: {len(shapes)} linear-layer shapes", f"{'role':<12}{'d_out':>8}{'d_in':>8}{'count':>8}{'params':>16}"]
    total = 0
    for s in shapes:
        params = s.numel * s.count
        total += params
        lines.append(f"{s.role:<12}{s.d_out:>8}{s.d_in:>8}{s.count:>8}{params:>16,}")
    lines.append(f"{'total':<36}{total:>16,}")
    return "\n".join(lines)
