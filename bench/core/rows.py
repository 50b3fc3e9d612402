"""Row kinds: what each kind of row in a results file holds, which version of it this
release writes and how an older one is upgraded, what identifies it and when it counts as
done (the one resume protocol every benchmark uses, ``bench.core.results``).

A results folder can come from anywhere (a colleague's run, a CI artifact, a hand edit).
Every row a reader takes from a file passes :func:`check_row` first: the fields the harness
and the report compute with must have their type (a number where a time is read, a list of
numbers where raw values are, a known dtype where a table is indexed by it), and the fields
that identify a row must be there. A row that fails names its file, line and field, and
what to do. Fields no table lists are carried as they are (they only ever reach the page
escaped). Strings are never trusted as markup: the report escapes every one.

Each kind carries its own ``version`` (the ``schema_version`` its writer stamps) and its
upgrade functions, one per older version; :func:`upgrade` applies them in turn, so a folder
written by an older release loads and resumes. Rows of the first schema (no ``kind``, no
``schema_version``) are init or history rows.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from bench.core.identity import SPECTRA, cell_key, digest

#: A check returns what is wrong with a value (``None``: nothing).
Check = Callable[[Any], "str | None"]

#: Row status values, shared by every row kind. "ok" rows carry measurements; the others a ``reason``.
OK, SKIPPED, TIMEOUT, CRASHED, FAILED, OOM = "ok", "skipped", "timeout", "crashed", "failed", "oom"
STATUSES = (OK, SKIPPED, TIMEOUT, CRASHED, FAILED, OOM)
#: Statuses of work that was tried and could not be measured.
FAILURES = (TIMEOUT, CRASHED, FAILED, OOM)
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def NUM(v: Any) -> str | None:
    """A number (NaN allowed: a missing value; never ±inf)."""
    if not _is_num(v):
        return f"must be a number, got {v!r:.60}"
    if math.isinf(v):
        return f"must be finite, got {v!r}"
    return None


def INT(v: Any) -> str | None:
    return None if _is_int(v) else f"must be an integer, got {v!r:.60}"


def COUNT(v: Any) -> str | None:
    """An integer >= 0."""
    return None if _is_int(v) and v >= 0 else f"must be an integer >= 0, got {v!r:.60}"


def POSITIVE(v: Any) -> str | None:
    """An integer >= 1."""
    return None if _is_int(v) and v >= 1 else f"must be an integer >= 1, got {v!r:.60}"


def STR(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, got {v!r:.60}"


def BOOL(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r:.60}"


def DICT(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"must be an object, got {v!r:.60}"


def one_of(*allowed: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r:.60}"
    return check


def list_of(item: Check) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return f"must be a list, got {v!r:.60}"
        for i, x in enumerate(v):
            if x is not None and (why := item(x)):
                return f"item {i} {why}"
        return None
    return check


def JSON_OBJECT(v: Any) -> str | None:
    """An object, or a string holding one (how options are written)."""
    if isinstance(v, dict):
        return None
    if not isinstance(v, str):
        return f"must be a JSON object or a string holding one, got {v!r:.60}"
    try:
        parsed = json.loads(v) if v.strip() else {}
    except json.JSONDecodeError:
        return f"must hold a JSON object, got {v!r:.60}"
    return None if isinstance(parsed, dict) else f"must hold a JSON object, got {v!r:.60}"


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def DEVICE(v: Any) -> str | None:
    return None if isinstance(v, str) and _DEVICE.fullmatch(v) else f"must be cpu or cuda[:N], got {v!r:.60}"


_SHAPE = re.compile(r"[1-9]\d*x[1-9]\d*")


def SHAPE(v: Any) -> str | None:
    return None if isinstance(v, str) and _SHAPE.fullmatch(v) else f"must be a shape like 4096x11008, got {v!r:.60}"


class RowVersionError(ValueError):
    """A row written by a newer release than this one."""


#: An upgrade: a row of one version in, the same row one version up out (a new dict). A
#: ``"module:function"`` string names one that lives with its benchmark (imported on first use).
Upgrade = Callable[[dict[str, Any]], dict[str, Any]] | str


def _resolve(ref: Callable | str) -> Callable:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class RowSpec:
    """A row kind: the fields it must have and the checks of the fields it may have
    (``None`` is allowed for every field that is not required), its version and upgrades,
    its identity and its resume rule."""

    kind: str
    required: tuple[str, ...] = ()
    fields: dict[str, Check] = field(default_factory=dict)
    #: checks by name prefix (``calib_``, ``fidelity_``, ``spec_`` ...)
    prefixes: dict[str, Check] = field(default_factory=dict)
    #: nested objects checked with another spec (a process run inside an init row)
    nested: dict[str, "RowSpec"] = field(default_factory=dict)
    #: the ``schema_version`` this release writes for the kind; a higher one is refused
    version: int = 2
    #: upgrade functions by the version they upgrade from; a version without one only gets
    #: its ``schema_version`` raised (nothing else of the kind changed)
    upgrades: Mapping[int, Upgrade] = field(default_factory=dict)
    #: applied to every row after its upgrades (``"module:function"``; empty: none)
    normalize: str = ""
    #: the fields whose :func:`bench.core.identity.digest` is the kind's key (empty: the
    #: ``task_key`` its writer computed)
    identity: tuple[str, ...] = ()
    #: how the key is computed when it is not a digest of fields (init cells: ``cell_key``,
    #: which fills the fields a hand-made row leaves out)
    key_fn: Callable[[Mapping[str, Any]], str] | None = None
    #: ``(status, limit field)``: a row of that status counts as done when the limit it was
    #: decided under is at least the current one (a larger limit retries it)
    retry_below: tuple[str, str] | None = None

    def key_of(self, row: Mapping[str, Any]) -> str:
        """The key of a row (its ``task_key``, which its writer computed) or of a task's
        fields (:meth:`identity_key`): what resume, matching and grouping use."""
        if self.key_fn is not None:
            return self.key_fn(row)
        if "task_key" in row:
            return str(row["task_key"])
        return self.identity_key(row)

    def identity_key(self, fields: Mapping[str, Any]) -> str:
        """The :func:`bench.core.identity.digest` of the kind's identity fields."""
        if not self.identity:
            raise TypeError(f"a {self.kind} row's key is the task_key its writer computed; it has no identity fields")
        return digest({name: fields[name] for name in self.identity})

    def is_done(self, row: Mapping[str, Any], limit: float | None = None) -> bool:
        """Whether ``row`` needs no new measurement: ok (a kind without a status, such as a
        loss summary, is written only when its run finished), or of the retry status under a
        limit at least ``limit``. Failures are always retried."""
        status = row.get("status", OK)
        if status == OK:
            return True
        if self.retry_below is None or status != self.retry_below[0]:
            return False
        return limit is None or (row.get(self.retry_below[1]) or 0.0) >= limit

    def upgrade(self, row: dict[str, Any], normalize: bool = True) -> dict[str, Any]:
        """``row`` in the version this release writes (a new dict when anything changed),
        then normalized (unless ``normalize`` is false)."""
        version = row.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version > self.version:
            raise RowVersionError(f"a {self.kind} row has schema_version {version!r}, newer than this loram-bench reads "
                                  f"({self.version}); upgrade loram-bench")
        while version < self.version:
            step = self.upgrades.get(version)
            row = _resolve(step)(row) if step is not None else dict(row)
            version += 1
            row["schema_version"] = version
        return _resolve(self.normalize)(row) if self.normalize and normalize else row

    def problem(self, row: dict[str, Any]) -> str | None:
        """What is wrong with ``row`` (``None``: nothing), naming the field."""
        for name in self.required:
            if row.get(name) is None:
                return f"a {self.kind} row needs field {name!r}"
        for name, value in row.items():
            if value is None:
                continue
            check = self.fields.get(name) or next((c for p, c in self.prefixes.items() if name.startswith(p)), None)
            if check is not None and (why := check(value)):
                return f"field {name!r} {why}"
            if name in self.nested:
                items = value if isinstance(value, list) else [value]
                for i, item in enumerate(items):
                    if not isinstance(item, dict):
                        return f"field {name!r} item {i} must be an object, got {item!r:.60}"
                    if (why := self.nested[name].problem(item)):
                        return f"field {name!r} item {i}: {why}"
        return None


#: The environment fields every row kind may carry (``bench.core.environment``).
ENVIRONMENT = {
    "git_commit": STR, "git_dirty": BOOL, "hostname": STR, "platform": STR, "python": STR, "cpu_model": STR,
    "cpu_count": COUNT, "memory_bytes": COUNT, "gpu_name": STR, "gpu_memory_bytes": COUNT, "cuda_version": STR,
    "torch_version": STR, "transformers_version": STR, "peft_version": STR, "numpy_version": STR,
    "pandas_version": STR, "scipy_version": STR, "plotly_version": STR, "run_id": STR, "timestamp": STR,
    "schema_version": POSITIVE, "kind": STR, "task_key": STR,
}
#: The identity of an init cell (``bench.core.identity``).
IDENTITY = {"initializer": STR, "d_out": POSITIVE, "d_in": POSITIVE, "rank": POSITIVE, "scaling": NUM,
            "dtype": one_of(*DTYPES), "device": DEVICE, "threads": COUNT, "options": JSON_OBJECT}
_NUMS = list_of(NUM)
_BYTES = list_of(COUNT)

PROCESS_RUN = RowSpec("process run", fields={
    "task_key": STR, "first_s": NUM, "first_event_s": NUM, "values_s": _NUMS, "event_values_s": _NUMS,
    "warmups": COUNT, "peak_cpu_extra_bytes": INT, "peak_rss_bytes": COUNT, "peak_gpu_allocated_bytes": COUNT,
    "peak_gpu_reserved_bytes": COUNT, "reconstruction_rel_err": NUM, "delta_rel_norm": NUM, "init_info": STR,
    "diagnostics_error": STR, "fidelity": DICT, "worker_wall_s": NUM, "environment": DICT, "cuda_event_gap": NUM})

INIT = RowSpec("init", required=("initializer", "d_out", "d_in", "status"), fields={
    **ENVIRONMENT, **IDENTITY, "status": one_of(*STATUSES), "reason": STR, "phase": STR, "role": STR, "preset": STR,
    "count": COUNT, "seed": INT, "warmups": COUNT, "values": COUNT, "min_values": COUNT, "value_budget_s": NUM,
    "spectrum": one_of(*SPECTRA), "processes": COUNT, "max_fidelity_elements": COUNT, "predicted_s": NUM, "limit_s": NUM,
    "floor_s": NUM,
    "floor_ratio": NUM, "weight_bytes": COUNT, "median_s": NUM, "mean_s": NUM, "stdev_s": NUM, "min_s": NUM,
    "max_s": NUM, "first_s": NUM, "values_s": _NUMS, "first_values_s": _NUMS, "event_values_s": _NUMS,
    "peak_cpu_extra_bytes": INT, "peak_rss_bytes": COUNT, "peak_gpu_allocated_bytes": COUNT,
    "peak_gpu_reserved_bytes": COUNT, "reconstruction_rel_err": NUM, "delta_rel_norm": NUM, "cuda_event_gap": NUM,
    "worker_wall_s": NUM, "init_info": STR, "torch_threads": COUNT, "cpu_peak_method": STR, "upgraded_from": INT,
    "legacy": DICT, "runs": list_of(DICT)},
    prefixes={"calib_": NUM, "fidelity_": NUM}, nested={"runs": PROCESS_RUN},
    upgrades={1: "bench.initcost.schema:upgrade_init_v1"}, normalize="bench.initcost.schema:rebuild_init_row",
    key_fn=cell_key, retry_below=(SKIPPED, "limit_s"))

LOSS_COMMON = {
    **ENVIRONMENT, "initializer": STR, "config_key": STR, "run_uid": STR, "model": STR, "data": STR,
    "data_sha256": STR, "lr": NUM, "seed": COUNT, "steps": POSITIVE, "batch_size": POSITIVE, "seq_len": POSITIVE,
    "rank": POSITIVE, "alpha": NUM, "use_rslora": BOOL, "scaling_mode": STR, "eval_every": POSITIVE,
    "eval_blocks": POSITIVE, "train_blocks": COUNT, "tokens": COUNT, "device": DEVICE, "dtype": one_of(*DTYPES),
    "autocast": STR, "threads": COUNT, "targets": STR, "base_eval_loss": NUM, "warmup_steps": COUNT,
    "schedule": one_of("linear", "cosine", "constant"), "lr_grid": STR, "equivalence_margin": NUM,
    "stage": one_of("selection", "evaluation", "selection+evaluation")}
LOSS = RowSpec("loss", required=("initializer", "step"), fields={
    **LOSS_COMMON, "step": POSITIVE, "train_loss": NUM, "eval_loss": NUM, "update_norm": NUM, "step_s": NUM})
LOSS_SUMMARY = RowSpec("loss_summary", required=("initializer",), fields={
    **LOSS_COMMON, "init_seconds": NUM, "init_layer_seconds": NUM, "layers": COUNT, "trainable_params": COUNT,
    "stats_seconds": NUM, "stats_samples": COUNT, "stats_peak_cpu_extra_bytes": INT,
    "stats_peak_gpu_allocated_bytes": INT, "step0_shift_norm": NUM, "step0_delta_rel_norm": NUM,
    "step0_eval_loss": NUM, "step0_eval_loss_change": NUM, "diverged_step": COUNT, "final_train_loss": NUM,
    "final_eval_loss": NUM, "final_update_norm": NUM, "eval_auc": NUM, "mean_step_s": NUM, "init_info": STR,
    "stats_collected_lr": NUM, "stats_derived": BOOL, "final_eval_blocks": _NUMS, "peak_lr": NUM},
    prefixes={"stats_": NUM, "delta_": NUM}, identity=("config_key", "initializer", "lr", "seed"))

LAYER_LOSS = RowSpec("layer_loss", required=("initializer", "d_out", "d_in", "status", "task_key", "suite_key"), fields={
    **ENVIRONMENT, **IDENTITY, "dtype": STR, "status": one_of(*STATUSES), "reason": STR, "phase": STR,
    "config_key": STR, "suite_key": STR, "alignment": one_of("aligned", "random", "bottom"), "lr": NUM, "seed": COUNT,
    "alpha": NUM, "use_rslora": BOOL, "steps": POSITIVE, "gradients": one_of("exact", "sampled"),
    "batch_size": POSITIVE, "sb_samples": POSITIVE, "da_tokens": COUNT, "sb_warmup_ratio": NUM, "spec": DICT,
    "role": STR, "preset": STR, "stats_lr": NUM, "init_method": STR, "limit_s": NUM, "init_limit_s": NUM,
    "predicted_init_s": NUM, "final_loss": NUM, "loss_floor": NUM, "auc": NUM, "step0_loss": NUM,
    "final_update_norm": NUM, "diverged_step": COUNT, "loss": _NUMS, "train_loss": _NUMS, "update_norm": _NUMS,
    "init_seconds": NUM, "init_cached": BOOL, "init_info": STR, "init_peak_cpu_extra_bytes": INT,
    "init_peak_gpu_allocated_bytes": INT, "train_peak_cpu_extra_bytes": INT, "train_peak_gpu_allocated_bytes": INT,
    "train_seconds": NUM, "train_threads": COUNT, "median_step_s": NUM, "trainable_params": COUNT, "stats_seconds": NUM,
    "stats_samples": COUNT, "stats_derived": BOOL, "step0_delta_rel_norm": NUM, "residual_probe_rel_err": NUM,
    "target_norm": NUM, "weight_norm_expected": NUM, "edge": NUM, "worker_environment": STR, "worker_wall_s": NUM,
    "plane_key": STR, "lr_grid": STR, "arm": STR, "equivalence_margin": NUM,
    "stage": one_of("selection", "evaluation", "selection+evaluation", "magnitude"),
    "capacity_floor": NUM, "progress_fraction": NUM, "first_step_update_norm": NUM},
    prefixes={"spec_": lambda v: None if isinstance(v, str) or NUM(v) is None else f"must be a number or a string, got {v!r:.60}",
              "stats_": NUM},
    # version 3: W is one per shape (spec weight_seed), the target one per seed; rows carry
    # their capacity floor, stage and arm (version-2 rows read as unstaged, floorless runs)
    version=3, retry_below=(SKIPPED, "init_limit_s"))

SHARDED = RowSpec("sharded", required=("initializer", "d_out", "d_in", "world_size", "placement", "status", "task_key"),
                  fields={
    **ENVIRONMENT, **IDENTITY, "world_size": POSITIVE, "placement": one_of("row", "col"), "seed": INT,
    "repeats": COUNT, "check": BOOL, "shape": SHAPE, "numel": COUNT, "weight_bytes": COUNT,
    "status": one_of(*STATUSES), "reason": STR, "phase": STR, "limit_s": NUM, "time_s": NUM, "first_s": NUM,
    "values_s": _NUMS, "rank_values_s": list_of(_NUMS), "peak_cpu_extra_bytes": list_of(INT),
    "max_peak_cpu_extra_bytes": INT, "peak_rss_bytes": _BYTES, "max_peak_rss_bytes": COUNT,
    "peak_gpu_allocated_bytes": _BYTES, "max_peak_gpu_allocated_bytes": COUNT, "bytes_sent": _BYTES,
    "max_bytes_sent": COUNT, "collectives": DICT, "local_weight_bytes": _BYTES, "max_diff": NUM, "tolerance": NUM,
    "within_tolerance": BOOL}, prefixes={"diff_": NUM},
    # version 3: the key became the digest of the identity fields (version 2 joined them with "|")
    version=3, identity=("initializer", "d_out", "d_in", "rank", "scaling", "world_size", "placement", "device",
                         "dtype", "threads", "seed"),
    upgrades={2: lambda row: {**row, "task_key": SHARDED.identity_key(row)}}, retry_below=(TIMEOUT, "limit_s"))

HISTORY = RowSpec("history", required=("initializer",), fields={
    **ENVIRONMENT, **IDENTITY, "shape": SHAPE, "machine": STR, "median_s": NUM, "first_s": NUM,
    "peak_cpu_extra_bytes": INT, "peak_gpu_allocated_bytes": COUNT})
CHANGE = RowSpec("change", required=("initializer", "shape", "verdict"), fields={
    **HISTORY.fields, "verdict": STR, "time_ratio": NUM, "confirm_low": NUM, "confirm_high": NUM,
    "memory_ratio": NUM, "base_commit": STR})
GATE_ROUND = RowSpec("gate_round", required=("initializer", "d_out", "d_in", "stage", "side", "round", "status"), fields={
    **ENVIRONMENT, **IDENTITY, "shape": SHAPE, "stage": one_of("screen", "confirm"), "side": one_of("base", "new"),
    "round": COUNT, "slot": COUNT, "status": one_of(*STATUSES), "reason": STR, "phase": STR, "run": DICT,
    "base_commit": STR, "new_commit": STR, "base_fingerprint": STR, "new_fingerprint": STR, "slow_down": STR},
    nested={"run": PROCESS_RUN})

#: Every row kind by its ``kind`` field.
SPECS = {spec.kind: spec for spec in (INIT, LOSS, LOSS_SUMMARY, LAYER_LOSS, SHARDED, HISTORY, CHANGE, GATE_ROUND)}


def spec_of(row: dict[str, Any]) -> RowSpec | None:
    """The spec of a row's kind; first-schema rows without ``kind`` are init or history rows."""
    kind = row.get("kind")
    if kind is None:
        if "initializer" in row and "d_out" in row and "status" in row:
            return INIT
        return HISTORY if "initializer" in row and "machine" in row else None
    return SPECS.get(kind) if isinstance(kind, str) else None


def check_row(row: dict[str, Any]) -> str | None:
    """What is wrong with ``row`` (``None``: nothing). A kind this release does not know is
    not checked (its rows are never computed with)."""
    if "kind" in row and not isinstance(row["kind"], str):
        return f"field 'kind' must be a string, got {row['kind']!r:.60}"
    spec = spec_of(row)
    return None if spec is None else spec.problem(row)


#: The version of the row format shared by every kind; a row of no known kind without a
#: ``schema_version`` reads as this one (it is carried, never computed with).
BASE_VERSION = 2


def upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` in the version this release writes for its kind (a kind this release does not
    know is carried as it is, stamped with :data:`BASE_VERSION` when it has no version)."""
    spec = spec_of(row)
    if spec is None:
        return row if "schema_version" in row else {**row, "schema_version": BASE_VERSION}
    return spec.upgrade(row)


def is_newer(row: dict[str, Any]) -> bool:
    """Whether ``row`` was written by a newer release than this one (its checks are then
    left to the reader, which says to upgrade)."""
    spec = spec_of(row)
    version = row.get("schema_version")
    return (spec is not None and isinstance(version, int) and not isinstance(version, bool)
            and version > spec.version)
