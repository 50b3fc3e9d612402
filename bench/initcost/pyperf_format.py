"""Init results in pyperf's JSON format, so that pyperf's own tools open them
(``python -m pyperf stats FILE``, ``hist``, ``compare_to BASE NEW``).

One pyperf benchmark per measured cell, named ``initializer d_outxd_in r<rank> <dtype>
<device> t<threads>`` (plus its options); one pyperf run per worker process, holding
that process's steady-state values and its cold first call as a warm-up (pyperf's
Run/Benchmark split is the one ``bench.initcost.schema`` follows). The cell's identity, its
``task_key``, peak memory and the machine's environment are metadata. Cells that were
not measured (skipped, failed) have no values and are left out: pyperf has no place
for them; ``init.jsonl`` keeps them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyperf

from bench.core.identity import identity, parse_options

#: Environment fields carried into each benchmark's metadata (when not empty).
_ENV_METADATA = ("git_commit", "hostname", "cpu_model", "cpu_count", "platform", "python", "torch_version", "gpu_name",
                 "cuda_version")


def benchmark_name(row: dict[str, Any]) -> str:
    ident = identity(row)
    name = f"{ident['initializer']} {ident['d_out']}x{ident['d_in']} r{ident['rank']} {ident['dtype']} " \
           f"{ident['device']} t{ident['threads']}"
    if ident["scaling"] != 1.0:
        name += f" s{ident['scaling']:g}"
    if ident["options"]:
        name += " " + json.dumps(ident["options"], sort_keys=True, separators=(",", ":"))
    return name


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    ident = identity(row)
    meta: dict[str, Any] = {"name": benchmark_name(row), "unit": "second", "loops": 1, "task_key": row["task_key"],
                            "initializer": ident["initializer"], "d_out": ident["d_out"], "d_in": ident["d_in"],
                            "rank": ident["rank"], "scaling": ident["scaling"], "dtype": ident["dtype"],
                            "device": ident["device"], "threads": ident["threads"],
                            "options": json.dumps(ident["options"], sort_keys=True)}
    for key in _ENV_METADATA:
        value = row.get(key)
        if value not in (None, "", 0) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            meta[key] = value
    return meta


def _run(process: dict[str, Any], meta: dict[str, Any]) -> "pyperf.Run | None":
    import pyperf

    values = [float(v) for v in process.get("values_s") or [] if v and v > 0]
    if not values:
        return None
    first = process.get("first_s")
    run_meta = dict(meta)
    for key in ("peak_cpu_extra_bytes", "peak_gpu_allocated_bytes"):
        if process.get(key):
            run_meta[key] = int(process[key])
    return pyperf.Run(values, warmups=[(1, float(first))] if first and first > 0 else None, metadata=run_meta,
                      collect_metadata=False)


def to_suite(rows: list[dict[str, Any]]) -> "pyperf.BenchmarkSuite | None":
    """A pyperf suite of the ok init rows (the latest row per cell); None when none has values."""
    import pyperf

    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("kind", "init") == "init" and row.get("status") == "ok":
            latest[row["task_key"]] = row
    benchmarks = []
    for row in latest.values():
        meta = _metadata(row)
        runs = [r for r in (_run(p, meta) for p in row.get("runs") or []) if r is not None]
        if runs:
            benchmarks.append(pyperf.Benchmark(runs))
    return pyperf.BenchmarkSuite(benchmarks) if benchmarks else None


def write_pyperf(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Write ``path`` (pyperf JSON) from init rows; remove a stale one when no cell has values.
    Where pyperf is not installed (a GPU image without it still measures), a note says so."""
    path = Path(path)
    if importlib.util.find_spec("pyperf") is None:
        print(f"note: {path.name} not written: pyperf is not installed (pip install pyperf)", file=sys.stderr)
        return None
    suite = to_suite(rows)
    if suite is None:
        path.unlink(missing_ok=True)
        return None
    suite.dump(str(path), replace=True)
    return path


def read_pyperf(path: Path) -> dict[str, dict[str, Any]]:
    """``task_key → {"identity", "runs": [values per process], "warmups": [cold call per process]}``
    from a pyperf file written by :func:`write_pyperf` (or by pyperf tools that keep metadata)."""
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(path))
    out: dict[str, dict[str, Any]] = {}
    for bench in suite.get_benchmarks():
        meta = bench.get_metadata()
        ident = {k: meta[k] for k in ("initializer", "d_out", "d_in", "rank", "scaling", "dtype", "device", "threads")}
        ident["options"] = parse_options(meta.get("options"))
        out[meta["task_key"]] = {
            "identity": ident,
            "runs": [list(run.values) for run in bench.get_runs()],
            "warmups": [[value for _, value in run.warmups] for run in bench.get_runs()],
        }
    return out


def export_init(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """The init rows as ``init.csv`` / ``init.json`` (``bench.core.results.export_kind``) and
    as ``init.pyperf.json`` (:func:`write_pyperf`)."""
    from bench.core.results import export_kind

    paths = export_kind(rows, out_dir, "init")
    write_pyperf([r for r in rows if r.get("kind") == "init"], Path(out_dir) / "init.pyperf.json")
    return paths
