#!/usr/bin/env python3
"""The CUDA paths checked in one prepared run on a lent GPU machine, within 8 minutes.

On the GPU machine, from the repository root (the device tool's ``run``; no network there)::

    python3 scripts/device_check.py --out "$OUT"

It installs the project without network: the repository goes on ``PYTHONPATH`` and every
step runs from a folder of its own outside it (the harness keeps each child process's
working folder off its import path, not the repository), so no build and no package index
is needed; wheels of missing packages, if any are carried in ``--wheels``, are installed into
a site folder on the same path. Then it runs the :data:`PLAN`: the tests
marked ``cuda``, ``loram-bench run`` on the llama-3-70b preset in bf16 on CUDA with its
floors, the layer task on CUDA at a 70B shape, ``sharded`` with nccl at world size 1, and
``continuous HEAD`` on two CUDA cells. Each step has its own time limit (their sum is at
most 8 minutes); a step that fails or runs out of time is recorded and the next one runs.
Everything the reply brings back lands in ``--out``: at most 8 files (:data:`OUTPUTS`),
each cut to 16 MiB: ``device-check.json`` (the environment, each step's status and time,
and the figures: LoRAM against the calibrated floor at 28672 x 8192), the log, and each
step's results file.

Anywhere, without a GPU (``tests/test_device_check.py`` runs it in CI)::

    python3 scripts/device_check.py --dry-run

checks the plan without running it: every ``loram-bench`` command parses with the command
line's own parser, the time limits sum to at most 8 minutes, at most 8 files come back, every
dependency of the project is on the GPU image (:data:`IMAGE_PACKAGES`), carried as a wheel or
optional (:data:`OPTIONAL`), and the commands import with the optional packages absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The whole run's limit: the device tool allows 10 minutes a command; 2 are left for the
#: start, the install and the transfers.
TOTAL_LIMIT_S = 480
#: The reply brings back at most 8 files of 16 MiB each.
MAX_FILES = 8
MAX_FILE_BYTES = 16 << 20

#: Distributions the GPU image holds (torch 2.11 with CUDA and the scientific stack; the
#: device machine's package list). The project's others are :data:`OPTIONAL` or must be
#: carried as wheels.
IMAGE_PACKAGES = frozenset({
    "torch", "transformers", "peft", "numpy", "pandas", "scipy", "psutil", "tqdm", "safetensors", "attrs", "pytest",
    "hypothesis", "packaging", "pyyaml", "huggingface-hub", "tokenizers", "accelerate",
})
#: Dependencies the checked commands do without, and what is left out where they are absent.
OPTIONAL = {
    "plotly": "the HTML report (each command says it was not written)",
    "pyperf": "init.pyperf.json (a note says it was not written)",
    "gguf": "the embedded SmolLM2 (loading its GGUF); the check trains a tiny model instead",
}


@dataclass(frozen=True)
class Step:
    """One command of the check: ``argv`` (``loram-bench`` commands start with ``loram-bench``),
    its time limit, and the results file it leaves in its folder (copied into ``--out``)."""

    name: str
    argv: tuple[str, ...]
    limit_s: int
    result: str = ""
    needs_git: bool = False

    @property
    def is_cli(self) -> bool:
        return self.argv[0] == "loram-bench"


#: The 70B MLP shape every per-shape step measures at.
SHAPE_70B = "28672x8192"
PLAN: tuple[Step, ...] = (
    Step("tests", ("pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"), 110,
         result="pytest-cuda.txt"),
    Step("run", ("loram-bench", "run", "--preset", "llama-3-70b", "--dtype", "bfloat16", "--device", "cuda",
                 "--initializers", "loram_dst", "loram_rorth", "pissa_rsvd", "lora_sb",
                 "--processes", "1", "--values", "5", "--limit", "30", "--no-progress"), 120, result="init.jsonl"),
    Step("layer", ("loram-bench", "layer-loss", "--device", "cuda", "--shapes", SHAPE_70B, "--initializers",
                   "noise_zeros", "loram_dst", "pissa_rsvd", "--seeds", "0", "--selection-seeds", "1", "--lrs", "1e-3",
                   "--no-bracket", "--steps", "20", "--alignment", "aligned", "--no-progress"), 70,
         result="layer_loss.jsonl"),
    Step("sharded", ("loram-bench", "sharded", "--device", "cuda", "--world-size", "1", "--shape", SHAPE_70B,
                     "--dtype", "bfloat16", "--initializers", "loram_dst", "noise_zeros", "pissa_rsvd",
                     "--no-progress"), 60, result="sharded.jsonl"),
    Step("gate", ("loram-bench", "continuous", "HEAD", "--device", "cuda", "--dtype", "bfloat16", "--shape",
                  "8192x8192", "--initializers", "loram_dst", "noise_zeros", "--gate-unchanged", "--screen-rounds",
                  "3", "--confirm-rounds", "3", "--no-progress"), 100, result="gate.json", needs_git=True),
)


def outputs(plan: tuple[Step, ...]) -> tuple[str, ...]:
    """What comes back from ``plan``: the summary, the log, and each step's results file."""
    return ("device-check.json", "device-check.log", *(s.result for s in plan if s.result))


OUTPUTS = outputs(PLAN)


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)


# -- checks that need no GPU --------------------------------------------------------------

def requirement_names() -> list[str]:
    """The distributions the project needs: its dependencies and its test and loss extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["test"],
             *project["optional-dependencies"]["loss"]]
    return sorted({re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].strip().lower() for spec in specs})


def wheel_names(wheels: Path | None) -> set[str]:
    """Distribution names of the wheels in ``wheels`` (``NAME-VERSION-...whl``)."""
    if wheels is None or not wheels.is_dir():
        return set()
    return {p.name.split("-", 1)[0].lower().replace("_", "-") for p in wheels.glob("*.whl")}


def missing_packages(wheels: Path | None = None) -> list[str]:
    """Requirements neither on the image, nor carried, nor optional (none for the plan to run)."""
    have = IMAGE_PACKAGES | wheel_names(wheels) | set(OPTIONAL)
    return [name for name in requirement_names() if name.replace("_", "-") not in have]


def plan_problems(plan: tuple[Step, ...] = PLAN) -> list[str]:
    """What is wrong with ``plan`` (none: it can run as it stands)."""
    sys.path.insert(0, str(ROOT))
    from bench.cli import build_parser  # builds every command's parser without importing torch

    parser = build_parser()
    problems = []
    total = sum(step.limit_s for step in plan)
    if total > TOTAL_LIMIT_S:
        problems.append(f"the steps' limits sum to {total} s, over the {TOTAL_LIMIT_S} s the run may take")
    back = outputs(plan)
    if len(back) > MAX_FILES or len(set(back)) != len(back):
        problems.append(f"the run brings back {len(back)} files ({', '.join(back)}): at most {MAX_FILES}, "
                        "each named once")
    for step in plan:
        if not step.is_cli:
            continue
        try:
            parser.parse_args(list(step.argv[1:]))
        except SystemExit:
            problems.append(f"step {step.name!r}: `{' '.join(step.argv)}` does not parse (see the line above)")
    return problems


def optional_imports_problem() -> str | None:
    """Import the modules the plan's commands run with the optional packages made
    unimportable, in a fresh interpreter: what goes wrong, or None."""
    probe = (  # a None entry in sys.modules: import raises, find_spec answers None, as for a package not installed
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({sorted(OPTIONAL)!r}))\n"
        "import bench.cli.init, bench.cli.loss, bench.cli.sharded, bench.cli.gate, bench.initcost.runner\n"
        "import bench.initcost.pyperf_format, bench.layer.run, bench.sharded.run, bench.gate.continuous\n"
        "from bench.cli.report import report\n"
        "assert report(__import__('pathlib').Path('.'), __import__('pathlib').Path('x.html')) == 1\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]


def dry_run(wheels: Path | None) -> int:
    print(f"device check plan ({sum(s.limit_s for s in PLAN)} s of {TOTAL_LIMIT_S} s; back: {', '.join(OUTPUTS)}):")
    for step in PLAN:
        print(f"  {step.name:8s} {step.limit_s:4d} s  {' '.join(step.argv)}")
    problems = plan_problems()
    missing = missing_packages(wheels)
    if missing:
        problems.append(f"not on the GPU image, not carried in --wheels and not optional: {', '.join(missing)}")
    print("optional there (what is left out without them): "
          + "; ".join(f"{name}: {what}" for name, what in OPTIONAL.items()))
    problem = optional_imports_problem()
    if problem:
        problems.append(f"the commands do not import without {', '.join(OPTIONAL)}: {problem}")
    for line in problems:
        print(f"PROBLEM: {line}")
    print("dry run: " + ("the plan is ready" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


# -- the run on the GPU machine ----------------------------------------------------------

def install(site: Path, wheels: Path | None, log) -> dict:
    """The environment every step runs in: the repository on ``PYTHONPATH`` (each step runs
    from a folder outside it, so the harness's children import it too, and the gate finds the
    git checkout it compares), and any carried wheels installed into ``site`` after it."""
    paths = [str(ROOT)]
    if wheel_names(wheels):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, sorted(wheels.glob("*.whl")))], check=True, stdout=log, stderr=log)
        paths.append(str(site))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
    return info


def complete_rows(path: Path) -> list[dict]:
    """The JSON rows of a results file, without the line a step stopped at its limit may have
    left half written."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def figures(step: Step, folder: Path) -> dict:
    """The figures a step's results hold that the closing note reports."""
    path = folder / step.result
    if not path.is_file() or step.name in ("tests", "gate"):
        return {}
    rows = complete_rows(path)
    if step.name == "run":
        return {f"{r['initializer']} {r['d_out']}x{r['d_in']}": {
            k: r.get(k) for k in ("status", "median_s", "floor_s", "floor_ratio", "peak_gpu_allocated_bytes",
                                  "cuda_event_gap", "calib_read_GBps", "calib_rw_GBps", "calib_lowrank_GFLOPs",
                                  "calib_projection_GFLOPs")} for r in rows if r.get("kind", "init") == "init"}
    if step.name == "layer":
        return {f"{r['initializer']} lr {r.get('lr')}": {k: r.get(k) for k in ("status", "init_seconds", "final_loss",
                                                                                  "capacity_floor")} for r in rows}
    return {f"{r.get('initializer')} world {r.get('world_size')} {r.get('placement')}": {
        k: r.get(k) for k in ("status", "time_s", "max_diff", "within_tolerance", "max_bytes_sent",
                              "max_peak_gpu_allocated_bytes")} for r in rows if r.get("kind") == "sharded"}


def command(step: Step, folder: Path, device: str = "cuda") -> list[str]:
    """The argv that runs ``step`` with its results in ``folder``: ``loram-bench`` through this
    interpreter's ``-m bench.cli``, pytest's test files by their path in the repository, and
    the values of ``--device`` set to ``device`` (nothing else named cuda changes)."""
    argv = [device if token == "cuda" and flag == "--device" else token
            for flag, token in zip(("",) + step.argv[:-1], step.argv)]
    if step.is_cli:
        return [sys.executable, "-m", "bench.cli", *argv[1:], "--out", str(folder)]
    if argv[0] == "pytest":
        return [sys.executable, "-m", *[str(ROOT / a) if a.startswith("tests/") else a for a in argv]]
    return argv


def run_step(step: Step, work: Path, env: dict, log, device: str = "cuda") -> Outcome:
    folder = work / step.name
    folder.mkdir(parents=True, exist_ok=True)
    if step.needs_git and subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        return Outcome(step.name, "skipped", detail="no git repository here: carry .git with the working tree")
    argv = command(step, folder, device)
    started = time.perf_counter()
    log.write(f"\n===== {step.name}: {' '.join(argv)}\n")
    log.flush()
    capture = (folder / step.result).open("w") if step.name == "tests" else log
    try:
        proc = subprocess.run(argv, cwd=folder, env=env, stdout=capture, stderr=subprocess.STDOUT, timeout=step.limit_s)
        status, detail = ("ok", "") if proc.returncode == 0 else ("failed", f"exit {proc.returncode}")
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"stopped at its {step.limit_s} s limit"
    finally:
        if capture is not log:
            capture.close()
    try:  # the step's status stands whatever its files hold
        if step.name == "gate" and (folder / "gate.json").is_file():
            detail = detail or ", ".join(f"{d['initializer']} {d['shape']}: {d['verdict']}"
                                         for d in json.loads((folder / "gate.json").read_text()))
        found = figures(step, folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        found = {"unreadable": f"{step.result}: {type(exc).__name__}: {exc}"}
    return Outcome(step.name, status, time.perf_counter() - started, detail, found)


def collect(work: Path, out: Path) -> None:
    """Each step's results file into ``out``, cut to :data:`MAX_FILE_BYTES` (a note marks a cut)."""
    for step in PLAN:
        source = work / step.name / step.result
        if source.is_file():
            data = source.read_bytes()
            if len(data) > MAX_FILE_BYTES:
                data = data[: MAX_FILE_BYTES - 64] + b"\n[cut at 16 MiB by device_check.py]\n"
            (out / step.result).write_bytes(data)


def run(out: Path, wheels: Path | None, device: str = "cuda") -> int:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "loram-device-check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    site = work / "site"
    started = time.perf_counter()
    with (out / "device-check.log").open("w") as log:
        env = install(site, wheels, log)
        outcomes = []
        for step in PLAN:
            outcomes.append(run_step(step, work, env, log, device))
            print(f"{step.name}: {outcomes[-1].status} in {outcomes[-1].seconds:.0f} s {outcomes[-1].detail}", flush=True)
    collect(work, out)
    summary = {"environment": environment(), "device": device, "seconds": time.perf_counter() - started,
               "steps": [asdict(o) for o in outcomes]}
    (out / "device-check.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"device check: {sum(o.status == 'ok' for o in outcomes)} of {len(outcomes)} steps ok in "
          f"{summary['seconds']:.0f} s; {out / 'device-check.json'}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check the plan without a GPU; run nothing")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-check")),
                        help="where the files to bring back go (default: $OUT, else ./device-check)")
    parser.add_argument("--wheels", type=Path, default=None, help="a folder of wheels the GPU image lacks (optional)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same plan on this machine's CPU, to try the script itself (slow: the 70B "
                             "steps stop at their limits, the cuda tests skip)")
    args = parser.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels} is not a folder")
    if args.dry_run:
        return dry_run(args.wheels)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("device check: no CUDA GPU here (--dry-run checks the plan without one)", file=sys.stderr)
        return 2
    return run(args.out, args.wheels, args.device)


if __name__ == "__main__":
    sys.exit(main())
