"""The adoption commands: ``init-adapter`` (an initialized adapter any training stack can
load) and ``adopt-cost`` (``loram_ref.peft.initialize`` on a model for every initializer,
next to PEFT's own ``get_peft_model``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.cli.args import add_init_option_flag, init_options

#: The files ``init-adapter`` writes in ``--out``.
ADAPTER_DIR, BASE_DIR, REPORT_FILE = "adapter", "base", "init_report.json"


def _source(model_path: Path | None):
    from bench.loss.model import local_source, quiet_transformers, smollm2_source

    quiet_transformers()
    return local_source(model_path) if model_path is not None else smollm2_source()


def _targets(model, requested: list[str] | None) -> list[str]:
    """``--target-modules`` checked against the model's linear layers (default: every
    projection of a Llama-style decoder layer that the model has)."""
    import torch

    from bench.loss.model import TARGETS

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if requested is None:
        chosen = [t for t in TARGETS if t in linear]
        if not chosen:
            raise ValueError(f"the model has none of the default target modules {TARGETS}; pass --target-modules "
                             f"(its linear layers: {', '.join(sorted(linear))})")
        return chosen
    missing = [t for t in requested if t not in linear]
    if missing:
        raise ValueError(f"--target-modules {' '.join(missing)}: not a linear layer of the model (it has "
                         f"{', '.join(sorted(linear))})")
    return list(requested)


def _data(args, tokenizer):
    """``--data FILE`` as ``--samples`` blocks of ``--seq-len`` tokens (the file's first ones)."""
    from bench.loss.data import file_corpus

    if args.data is None:
        return None
    corpus = file_corpus(args.data)
    ids = tokenizer(corpus.text)["input_ids"]
    count = len(ids) // args.seq_len
    if count < 1:
        raise ValueError(f"--data {args.data}: {len(ids)} tokens make no block of --seq-len {args.seq_len}")
    import torch

    count = min(count, args.samples)
    return torch.tensor(ids[: count * args.seq_len], dtype=torch.long).view(count, args.seq_len)


def cmd_init_adapter(args) -> int:
    import torch
    from peft import LoraConfig, get_peft_model

    import loram_ref
    from loram_ref.peft import initialize, save_as_plain_lora

    spec = loram_ref.get_initializer(args.initializer)
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    for flag, value in (("--samples", args.samples), ("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.plain and spec.invariant is loram_ref.Invariant.QUANTIZED:
        raise ValueError(f"--plain: {spec.name} replaces the base weights by their quantized form, which no LoRA on "
                         "the original base reproduces; drop --plain to write the quantized base next to the adapter")
    if spec.needs_statistics and args.data is None:
        raise ValueError(f"{spec.name} needs data for its {spec.statistics.label}: pass --data FILE (.txt, or .jsonl "
                         "with a 'text' field per line)")
    if spec.statistics.lr_rescale is not None and args.lr is None:
        raise ValueError(f"{spec.name} needs --lr (the training learning rate): its statistics follow it")
    options = init_options([f"{spec.name}.{item}" if "." not in item.partition("=")[0] else item
                            for item in args.init_option or []], [spec.name]).get(spec.name, {})
    out = Path(args.out)
    if (out / ADAPTER_DIR).exists() and any((out / ADAPTER_DIR).iterdir()) and not args.force:
        raise ValueError(f"--out {out} already holds an adapter; choose another folder or pass --force")
    source = _source(args.model_path)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = source.load(dtype, "cpu")
    model.eval()
    targets = _targets(model, args.target_modules)
    alpha = float(args.alpha) if args.alpha is not None else float(args.rank)
    config = LoraConfig(r=args.rank, lora_alpha=alpha, use_rslora=args.rslora, target_modules=targets,
                        lora_dropout=0.0, init_lora_weights=False)
    if args.model_path is not None:
        config.base_model_name_or_path = str(Path(args.model_path).resolve())
    peft_model = get_peft_model(model, config)
    blocks = _data(args, tokenizer)
    report = initialize(peft_model, spec.name, data=blocks, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                        num_train=args.num_train, progress=not args.no_progress, **options)
    written = {}
    rewrites = spec.invariant.rewrites_weight
    if args.plain or not rewrites:
        plain = save_as_plain_lora(peft_model, out / ADAPTER_DIR)
        written["adapter"] = {"path": str(out / ADAPTER_DIR), "rank": plain.config.r, "bytes": plain.nbytes,
                              "form": "plain (rank 2r: applies to the original base)" if plain.combined else "plain",
                              "base": "the original model"}
    else:
        peft_model.save_pretrained(out / ADAPTER_DIR)
        base = peft_model.unload()  # the base model, its rewritten layers holding their residuals
        base.save_pretrained(out / BASE_DIR)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out / BASE_DIR)
        written["adapter"] = {"path": str(out / ADAPTER_DIR), "rank": args.rank, "form": "initialized",
                              "base": str(out / BASE_DIR)}
        written["base"] = {"path": str(out / BASE_DIR),
                           "what": "the model with each adapted layer's weight replaced by the method's residual"
                           if spec.invariant is loram_ref.Invariant.FUNCTION_PRESERVING
                           else "the model with each adapted layer's weight quantized"}
    rows = [{"layer": layer.name.removeprefix("base_model.model."), "shape": list(layer.shape), "rank": layer.rank,
             "scaling": layer.scaling, "seconds": layer.seconds, "delta_rel_norm": layer.relative(layer.delta_norm),
             "output_change": layer.output_change, "weight_change": layer.weight_change,
             "invariant_holds": layer.holds(report.invariant), "info": layer.info} for layer in report.layers]
    record = {"initializer": spec.name, "invariant": spec.invariant.value, "model": source.name,
              "target_modules": targets, "rank": args.rank, "alpha": alpha, "rslora": args.rslora, "dtype": args.dtype,
              "seed": args.seed, "data": str(args.data) if args.data else None,
              "data_samples": report.stats_samples, "stats_seconds": report.stats_seconds,
              "seconds": report.seconds, "invariant_holds": report.invariant_holds,
              "max_invariant_error": report.max_invariant_error, "written": written, "layers": rows}
    (out / REPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(report.table().splitlines()[0])
    print(report.table().splitlines()[1])
    for key, value in written.items():
        print(f"{key}: {value['path']}" + (f" (load it on {value['base']})" if "base" in value else ""))
    if spec.invariant is loram_ref.Invariant.FUNCTION_PRESERVING and args.plain:
        print("note: the plain form's second half, [-B0; A0], must stay frozen for the method's training dynamics "
              "(it computes the same function either way)", file=sys.stderr)
    return 0 if report.invariant_holds is not False else 1


def cmd_adopt_cost(args) -> int:
    import torch

    from bench.adopt.cost import RESULTS_FILE, CostPlan, run_cost, table
    from bench.loss.data import load_corpus

    for flag, value in (("--samples", args.samples), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    source = _source(args.model_path)
    model, tokenizer = source.load(torch.float32, "cpu")
    folder = source.meta.get("model_path")
    if folder is None:
        raise ValueError(f"{source.name} is not a model folder a worker process can load; pass --model-path")
    targets = _targets(model, args.target_modules)
    del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenizer(load_corpus(args.data).text)["input_ids"]
    count = min(args.samples, len(ids) // args.seq_len)
    if count < 1:
        raise ValueError(f"the corpus makes no block of --seq-len {args.seq_len}")
    data = out / "adopt_data.pt"
    torch.save(torch.tensor(ids[: count * args.seq_len], dtype=torch.long).view(count, args.seq_len), data)
    import loram_ref

    methods = tuple(args.initializers or sorted(loram_ref.INITIALIZERS))
    plan = CostPlan(model=str(folder), methods=methods, rank=args.rank,
                    alpha=float(args.alpha if args.alpha is not None else args.rank), targets=tuple(targets),
                    data=str(data), batch_size=args.batch_size, lr=args.lr, dtype=args.dtype, threads=args.threads,
                    peft=not args.no_peft, plain=not args.no_plain, limit_s=args.limit)
    rows = run_cost(plan, out, say=(lambda text: None) if args.no_progress else (lambda text: print(text, flush=True)))
    print(table(rows))
    print(f"rows: {out / RESULTS_FILE}")
    return 0 if all(r.get("status") in ("ok", "not_run") for r in rows) else 1


def setup_arguments(sub: argparse._SubParsersAction, names: list[str], **_) -> None:
    c = sub.add_parser("adopt-cost", help="loram_ref.peft.initialize on a model for every initializer (time, peak "
                                          "memory, the plain conversion's size and logits error), next to PEFT's "
                                          "get_peft_model; each in a fresh process")
    c.add_argument("--model-path", type=Path, default=None,
                   help="a local Hugging Face causal-LM folder (default: the embedded SmolLM2-135M-Instruct)")
    c.add_argument("--initializers", nargs="+", choices=names, default=None, metavar="NAME",
                   help="initializers to measure (default: all)")
    c.add_argument("--rank", type=int, default=16, help="the LoRA rank r")
    c.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank)")
    c.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="linear layers to adapt (default: every Llama projection the model has)")
    c.add_argument("--data", type=Path, default=None,
                   help="text for the statistics passes (default: the Python reference of pydoc_data)")
    c.add_argument("--samples", type=int, default=8, help="blocks the statistics passes read")
    c.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    c.add_argument("--batch-size", type=int, default=8, help="the statistics passes' batch size")
    c.add_argument("--lr", type=float, default=1e-4, help="the training learning rate the statistics follow")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the model's dtype")
    c.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    c.add_argument("--limit", type=float, default=900.0, help="seconds a worker may run before it is killed")
    c.add_argument("--no-peft", action="store_true", help="skip PEFT's own get_peft_model runs")
    c.add_argument("--no-plain", action="store_true", help="skip the plain-LoRA conversion check")
    c.add_argument("--out", type=Path, required=True, help="the folder for adopt.jsonl")
    c.add_argument("--no-progress", action="store_true", help="no line per measurement")
    c.set_defaults(func=cmd_adopt_cost)
    p = sub.add_parser("init-adapter", help="write a LoRA adapter initialized by any initializer, loadable by PEFT "
                                            "(and, for methods that rewrite W, the residual base model)")
    p.add_argument("--model-path", type=Path, default=None,
                   help="a local Hugging Face causal-LM folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--initializer", required=True, choices=names, metavar="NAME",
                   help="the initializer (`loram-bench list`)")
    p.add_argument("--rank", type=int, required=True, help="the LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank, s = 1)")
    p.add_argument("--rslora", action="store_true", help="rsLoRA scaling s = alpha/sqrt(r)")
    p.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="linear layers to adapt, by their last name (default: every Llama projection the model has)")
    p.add_argument("--data", type=Path, default=None,
                   help="text for the data-aware initializers' statistics pass (.txt, or .jsonl with 'text')")
    p.add_argument("--samples", type=int, default=32, help="blocks of --data the statistics pass reads")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per block of --data")
    p.add_argument("--batch-size", type=int, default=8, help="the statistics pass's batch size")
    p.add_argument("--lr", type=float, default=None, help="the training learning rate (lora_sb derives its η from it)")
    p.add_argument("--num-train", type=int, default=None,
                   help="the training set's size (LoRA-DA's N, LoRA-SB's batches per epoch; default: --samples)")
    p.add_argument("--seed", type=int, default=0, help="seeds each layer's random draws")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the dtype the model is loaded and written in")
    add_init_option_flag(p)
    p.add_argument("--plain", action="store_true",
                   help="for methods that rewrite W: write the rank-2r form that applies to the original base "
                        "instead of the residual base")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (adapter/, base/, init_report.json)")
    p.add_argument("--force", action="store_true", help="overwrite an adapter already in --out")
    p.add_argument("--no-progress", action="store_true", help="no per-layer progress on stderr")
    p.set_defaults(func=cmd_init_adapter)
