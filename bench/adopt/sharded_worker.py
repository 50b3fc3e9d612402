"""``torchrun ... -m bench.adopt.sharded_worker PLAN.json``: ``loram_ref.peft.initialize`` on
an FSDP2-sharded PEFT model, on every rank.

Per method of the plan, each rank builds the same model, wraps it with PEFT, collects the
statistics of a data-aware method before sharding (``collect_statistics``: the pass does
not run on sharded weights), shards every decoder block and the root with
``fully_shard`` on a 1-D mesh (gloo on CPU, nccl on GPU), then runs ``initialize``
(sharded initializers where they exist, the gather baseline otherwise). Measured per rank:
the call's time, its peak RSS above the entry (``bench.core.measure.cpu_peak``) and the
bytes it sent. Then a sharded forward (the logits, against the unsharded base model's),
``steps`` optimizer steps on the same batches on every rank, the logits after them, and
``save_as_plain_lora`` (rank 0 writes ``OUT/plain-METHOD``).

Rank 0 writes ``OUT/rows.jsonl`` (one row per method, the ranks' figures as lists) and
``OUT/gathered.pt``: per method and layer the gathered ``A``, ``B`` and base weight at
init, and the logits, for the comparison with one process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from bench.adopt.models import decoder_layers, load_model, token_ids, train_steps
from bench.core.measure import cpu_peak
from bench.core.torchrun import close, leave


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available() and os.environ.get("LORAM_BENCH_DEVICE", "cpu").startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),)), "cuda" if cuda else "cpu"


def _one(method: str, plan: dict, mesh, device: str, out: Path) -> tuple[dict, dict]:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    from loram_ref.peft import collect_statistics, initialize, save_as_plain_lora
    from loram_ref.peft.layers import full_value, targets

    dtype = getattr(torch, plan.get("dtype", "float32"))
    model = load_model(plan["model"], dtype).to(device)
    ids = token_ids(model, plan.get("samples", 8), plan.get("seq_len", 12)).to(device)
    with torch.no_grad():
        base_logits = model(input_ids=ids[:2]).logits.float().cpu()
    config = LoraConfig(r=plan["rank"], lora_alpha=plan["alpha"], target_modules=plan["targets"], lora_dropout=0.0,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    stats = None
    import loram_ref

    if loram_ref.get_initializer(method).needs_statistics:
        stats, _ = collect_statistics(peft_model, method, ids, lr=plan.get("lr", 1e-3))
    for block in decoder_layers(peft_model.get_base_model()):
        fully_shard(block, mesh=mesh)
    fully_shard(peft_model.get_base_model(), mesh=mesh)
    dist.barrier()
    t0 = time.perf_counter()
    with cpu_peak() as peak:
        report = initialize(peft_model, method, stats=stats, seed=plan.get("seed", 0), lr=plan.get("lr", 1e-3))
    seconds = time.perf_counter() - t0
    gathered = {}
    for target in targets(peft_model, "default"):
        a = full_value(target.layer.lora_A["default"].weight.detach()).cpu()
        b = full_value(target.layer.lora_B["default"].weight.detach()).cpu()
        w = full_value(target.base.weight.detach()).cpu()
        gathered[target.module] = (a, b, w)
    with torch.no_grad():
        init_logits = peft_model(input_ids=ids[:2]).logits.float().cpu()
    train_steps(peft_model, ids, plan.get("steps", 2), plan.get("train_lr", 1e-2))
    with torch.no_grad():
        trained_logits = peft_model(input_ids=ids[:2]).logits.float().cpu()
    plain = save_as_plain_lora(peft_model, out / f"plain-{method}")
    row = {"method": method, "seconds": seconds, "init_layer_seconds": sum(l.seconds for l in report.layers),
           "peak_cpu_extra_bytes": peak.extra_bytes, "peak_method": peak.method,
           "bytes_sent": sum(l.bytes_sent for l in report.layers),
           "placements": sorted({l.placement for l in report.layers}), "layers": len(report.layers),
           "invariant_holds": report.invariant_holds, "max_invariant_error": report.max_invariant_error,
           "plain_rank": plain.config.r, "plain_bytes": plain.nbytes}
    tensors = {"layers": gathered, "base_logits": base_logits, "init_logits": init_logits,
               "trained_logits": trained_logits}
    return row, tensors


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: torchrun ... -m bench.adopt.sharded_worker PLAN.json", file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[0]).read_text())
    out = Path(plan["out"])
    mesh, device = _mesh()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(plan.get("threads", 1))
    rows, tensors = [], {}
    try:
        for method in plan["methods"]:
            row, found = _one(method, plan, mesh, device, out)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, row)
            merged = {"kind": "adopt_sharded", "method": method, "world_size": world, "device": device,
                      "model": plan["model"], "rank": plan["rank"]}
            for key in row:
                if key != "method":
                    merged[key] = [r[key] for r in per_rank]
            rows.append(merged)
            tensors[method] = found
            if rank == 0:
                print(f"{method}: {max(merged['seconds']):.3f} s, peak {max(merged['peak_cpu_extra_bytes'])} B, "
                      f"sent {merged['bytes_sent']} B per rank", flush=True)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with (out / "rows.jsonl").open("w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, sort_keys=True) + "\n")
            torch.save(tensors, out / "gathered.pt")
    except BaseException:  # noqa: BLE001 - torchrun ends the other ranks, which may wait in a collective
        traceback.print_exc()
        leave(1)
    close()
    return 0


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
