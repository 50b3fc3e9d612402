"""``loram_ref.peft.initialize`` on an FSDP2-sharded model: 2 ranks under torchrun (gloo, CPU).

One launch of ``bench.adopt.sharded_worker`` initializes the same tiny Llama with sharded
initializers (LoRAM, OLoRA, orthogonal, noise-zeros, randomized-SVD PiSSA), the gather
baseline (full-SVD PiSSA) and two data-aware methods whose statistics were collected before
sharding (LoRA-GA, EVA: the gather baseline with ``stats=``). Here each gathered result is
compared with ``initialize`` in one process, within the sharded spec's tolerance
(``loram_ref.sharded``; for methods without a sharded version, :data:`GATHER_TOL`), and the
bytes each rank sent with their closed forms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import loram_ref  # noqa: E402
from bench.adopt.models import tiny_llama, token_ids  # noqa: E402
from bench.sharded.launch import ShardedLauncher  # noqa: E402
from loram_ref.peft import collect_statistics, initialize  # noqa: E402
from loram_ref.sharded import SHARDED  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
METHODS = ["loram_dst", "olora", "orthogonal", "noise_zeros", "pissa_rsvd", "pissa", "lora_ga", "eva"]
#: the gather baseline of a method without a sharded version runs the same computation on the
#: same whole weight in another process (1 thread there, 2 here): rounding-level differences
GATHER_TOL = 1e-4
LOGITS_TOL = 1e-5
PLAIN_TOL = 1e-4


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("adopt-sharded")
    plan = {"model": "tiny", "methods": METHODS, "rank": 4, "alpha": 8, "targets": TARGETS, "out": str(out / "out"),
            "samples": 8, "seq_len": 12, "steps": 2, "lr": 1e-3}
    (out / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                           "--max-restarts=0", "-m", "bench.adopt.sharded_worker", str(out / "plan.json")],
                          cwd=out, env=ShardedLauncher().environment(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = {r["method"]: r for r in map(json.loads, (out / "out" / "rows.jsonl").read_text().splitlines())}
    return rows, torch.load(out / "out" / "gathered.pt"), out / "out", plan


def _single(method: str, plan: dict):
    model = get_peft_model(tiny_llama(), LoraConfig(r=plan["rank"], lora_alpha=plan["alpha"], target_modules=TARGETS,
                                                    lora_dropout=0.0, init_lora_weights=False))
    ids = token_ids(model, plan["samples"], plan["seq_len"])
    stats = None
    if loram_ref.get_initializer(method).needs_statistics:
        stats, _ = collect_statistics(model, method, ids, lr=plan["lr"])
    initialize(model, method, stats=stats, seed=0, lr=plan["lr"])
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = (module.lora_A["default"].weight.detach(),
                                                           module.lora_B["default"].weight.detach(),
                                                           module.get_base_layer().weight.detach())
    return out


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.double().abs().max())
    err = float((x.double() - ref.double()).abs().max())
    return err / scale if scale > 0 else err


def _signs(b: torch.Tensor, a: torch.Tensor, ref_b: torch.Tensor, ref_a: torch.Tensor) -> torch.Tensor:
    """Per triplet, the sign that aligns (A, B) with the reference's (from B, or A where B is 0):
    the SVD-based methods leave each triplet's sign to their routine."""
    from_b = torch.sign((b.double() * ref_b.double()).sum(dim=0))
    from_a = torch.sign((a.double() * ref_a.double()).sum(dim=1))
    signs = torch.where(from_b != 0, from_b, from_a)
    signs[signs == 0] = 1
    return signs


@pytest.mark.parametrize("method", METHODS)
def test_the_gathered_result_equals_one_process(launched, method):
    rows, tensors, _, plan = launched
    tol = SHARDED[method].tolerance[torch.float32] if method in SHARDED else GATHER_TOL
    reference = _single(method, plan)
    got = tensors[method]["layers"]
    assert set(got) == set(reference) and len(got) == 2 * len(TARGETS)
    for layer, (a, b, w) in got.items():
        ref_a, ref_b, ref_w = reference[layer]
        signs = _signs(b, a, ref_b, ref_a).to(a.dtype)
        diffs = (_rel(a * signs[:, None], ref_a), _rel(b * signs, ref_b), _rel(w, ref_w))
        assert max(diffs) <= tol, f"{method} {layer}: A, B, W differ by {diffs} > {tol:g}"
    assert rows[method]["invariant_holds"] == [True] * WORLD
    assert rows[method]["layers"] == [2 * len(TARGETS)] * WORLD


@pytest.mark.parametrize("method", METHODS)
def test_the_sharded_model_computes_what_the_invariant_says_and_its_plain_adapter_reloads(launched, method):
    rows, tensors, out, _ = launched
    found = tensors[method]
    spec = loram_ref.get_initializer(method)
    if spec.invariant in (loram_ref.Invariant.FUNCTION_PRESERVING, loram_ref.Invariant.ZERO_PRODUCT):
        assert float((found["init_logits"] - found["base_logits"]).abs().max()) <= LOGITS_TOL
    assert float((found["trained_logits"] - found["init_logits"]).abs().max()) > 1e-4  # the sharded steps trained
    fresh = PeftModel.from_pretrained(tiny_llama(), out / f"plain-{method}").eval()
    ids = token_ids(fresh, 8, 12)
    with torch.no_grad():
        got = fresh(input_ids=ids[:2]).logits.float()
    assert float((got - found["trained_logits"]).abs().max()) <= PLAIN_TOL


def test_bytes_sent_per_rank_follow_the_methods_communication(launched):
    rows, tensors, _, _ = launched
    layers = 2 * len(TARGETS)
    assert rows["loram_dst"]["bytes_sent"] == [layers * 8] * WORLD  # one float64 all-reduced: 2·(p−1)/p·8 bytes
    assert rows["orthogonal"]["bytes_sent"] == [0] * WORLD and rows["noise_zeros"]["bytes_sent"] == [0] * WORLD
    # the gather baseline: (p − 1) padded shards of each whole weight (FSDP2 shards rows)
    shapes = [w.shape for _, _, w in tensors["pissa"]["layers"].values()]
    gathered = sum((WORLD - 1) * -(-m // WORLD) * n * 4 for m, n in shapes)
    for method in ("pissa", "lora_ga", "eva"):
        assert rows[method]["bytes_sent"] == [gathered] * WORLD, method
        assert rows[method]["placements"] == [["gathered"]] * WORLD
    for method in ("loram_dst", "olora", "orthogonal", "pissa_rsvd"):
        assert rows[method]["placements"] == [["sharded"]] * WORLD
    # O((m+n)·r) products instead of the m x n weight; the randomized SVD's 2·niter + 2 products
    # of q = r columns outweigh a 32 x 32 weight, so it is not among them at these sizes
    for method in ("loram_dst", "olora", "orthogonal"):
        assert max(rows[method]["bytes_sent"]) < gathered
    assert min(rows["pissa_rsvd"]["bytes_sent"]) > 0
    assert all(isinstance(v, int) and v >= 0 for r in rows.values() for v in r["peak_cpu_extra_bytes"])


def test_what_the_sharded_path_refuses_it_says(launched):
    """LoRA-SB's R is a parametrization FSDP2's parameters do not take, and a data-aware method
    needs its statistics collected before sharding: both refused with what to do (checked in
    one process: a DTensor weight on a 1-rank mesh is enough)."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        fully_shard(model.get_base_model(), mesh=mesh)
        with pytest.raises(ValueError, match="collect_statistics"):
            initialize(model, "corda", data=token_ids(model, 4, 8))
        with pytest.raises(ValueError, match="initialize before sharding"):
            initialize(model, "lora_sb", stats={}, lr=1e-3)
    finally:
        dist.destroy_process_group()
