"""Result files: rows appended to JSONL as each measurement finishes, read back in the
version this release writes (each kind's upgrades, ``bench.core.rows``), and exported as
tidy CSV / JSON tables. One resume protocol serves every benchmark: :func:`resume` opens a
file for appending and returns its rows, :func:`done_keys` says which of them need no new
measurement under the kind's rule (``RowSpec.is_done``).

JSONL is the canonical store, append-only, so a crash loses nothing and a rerun skips
what is done. It is kept safe against the damage a kill or a disk can do:

* each row is one ``os.write`` of a whole line on an ``O_APPEND`` descriptor; a file whose
  last line was cut off (a kill during a write) gets a newline first, so the next row is
  never glued onto the torn one;
* readers skip a line that does not parse and say so, with its line number;
* a row that parses is data, not trusted: its fields are checked (``bench.core.rows``) and a
  reader refuses a row that fails, naming the file, line and field;
* writers :func:`repair` a file before their first append: every line that is not a row,
  or a row that fails its checks, is moved to a side file (``init.rejected.jsonl`` beside
  ``init.jsonl``) with its line number and why, so nothing is deleted and the cell it held
  is measured again;
* a results file that cannot be written is an error before anything is measured.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from bench.core import rows as kinds
from bench.core.rows import CRASHED, FAILED, OK, OOM, SKIPPED, TIMEOUT, RowSpec, check_row

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CRASHED", "FAILED", "OK", "OOM", "SKIPPED", "TIMEOUT", "ResultsFileError", "append_row", "append_rows",
           "check_writable", "done_keys", "export", "export_kind", "new_run_id", "outcome_summary", "read_rows", "rejected_path", "repair", "replace_text",
           "resume", "timestamp", "to_frame"]


class ResultsFileError(ValueError):
    """A results file that cannot be used as it is (not writable, not JSON lines)."""


@dataclass(frozen=True)
class Damage:
    """One line of a results file that is not a row."""

    line: int
    text: str
    why: str


def rejected_path(path: Path) -> Path:
    """The side file of ``path`` that damaged lines are moved to (``x.jsonl`` → ``x.rejected.jsonl``)."""
    return path.with_name(path.stem + ".rejected" + path.suffix)


def _scan(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Damage]]:
    """Rows with their line numbers, and the lines that are not rows."""
    rows: list[tuple[int, dict[str, Any]]] = []
    damages: list[Damage] = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = bool(data) and not data.endswith(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", errors="replace")
        cut = torn and number == len(lines)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            damages.append(Damage(number, text, "cut off (the writer was killed mid-line)" if cut else f"not JSON: {exc}"))
            continue
        if not isinstance(row, dict):
            damages.append(Damage(number, text, f"a JSON {type(row).__name__}, not a row"))
        else:  # (a whole row without its newline is kept: the next append adds the newline)
            rows.append((number, row))
    return rows, damages


def _failed_checks(rows: list[tuple[int, dict[str, Any]]]) -> list[Damage]:
    """The rows that fail their kind's checks (a newer release's rows are left to the
    reader, which says to upgrade)."""
    out = []
    for number, row in rows:
        why = None if kinds.is_newer(row) else check_row(row)
        if why:
            out.append(Damage(number, json.dumps(row, sort_keys=True, default=str), why))
    return out


def check_writable(path: Path) -> None:
    """Fail before any measurement when ``path`` (or its folder) cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise ResultsFileError(f"results file {path} is not writable ({exc.strerror}): choose another --out or fix its "
                               "permissions") from None


def repair(path: Path, say=None) -> list[Damage]:
    """Move every line of ``path`` that is not a row to its side file, keep the rows.

    The file is rewritten atomically (a temporary file, then ``os.replace``). Each moved
    line is reported as ``file:line: why``. Returns the damages found (none: untouched).
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows, damages = _scan(path)
    invalid = _failed_checks(rows)
    if invalid:
        bad = {d.line for d in invalid}
        rows = [(n, r) for n, r in rows if n not in bad]
        damages = sorted([*damages, *invalid], key=lambda d: d.line)
    if not damages:
        return []
    say = say or (lambda text: print(text, file=sys.stderr))
    side = rejected_path(path)
    stamp = timestamp()
    with side.open("a") as fh:
        for d in damages:
            fh.write(json.dumps({"file": path.name, "line": d.line, "why": d.why, "text": d.text, "set_aside": stamp}) + "\n")
    replace_text(path, "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for _, row in rows))
    for d in damages:
        say(f"{path}:{d.line}: {d.why}; moved to {side}")
    return damages


def replace_text(path: Path, text: str) -> None:
    """Rewrite ``path`` atomically: a temporary file of its own in the same folder, then
    ``os.replace`` (two writers in one folder never share a temporary name)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as whole lines in one write (one run's rows land together or not at all
    as far as a kill between rows is concerned)."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ResultsFileError(f"results file {path} is not writable ({exc.strerror}): choose another --out or fix its "
                               "permissions") from None
    try:
        size = os.fstat(fd).st_size
        if size:
            with path.open("rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data  # a torn last line stays a line of its own
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row as one line. Writers stamp their kind's ``schema_version``
    (``RowSpec.version``) on what they build; a row without one reads as schema 1."""
    append_rows(path, [row])


_REPORTED: set[tuple[str, int, int]] = set()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file in the current schema. Lines that are not rows are
    skipped and reported once with their line numbers (a writer's :func:`repair` sets
    them aside). A row that fails its checks (``bench.core.rows``) is refused: a
    :class:`ResultsFileError` names the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        return []
    rows, damages = _scan(path)
    for d in damages:
        mark = (str(path.resolve()), d.line, hash(d.text))
        if mark not in _REPORTED:
            _REPORTED.add(mark)
            print(f"warning: {path}:{d.line}: {d.why}; line skipped", file=sys.stderr)
    for d in _failed_checks(rows):
        raise ResultsFileError(f"{path}:{d.line}: {d.why}; this is not a row loram-bench writes: fix or delete that "
                               "line (a run that appends to the file moves it aside)")
    out = []
    for number, row in rows:
        try:
            out.append(kinds.upgrade(row))
        except (TypeError, ValueError, KeyError) as exc:
            if isinstance(exc, ResultsFileError):
                raise
            raise ResultsFileError(f"{path}:{number}: {exc}") from None
    return out


def resume(path: Path, say=None) -> list[dict[str, Any]]:
    """Open ``path`` for a run that appends to it: fail now if it cannot be written, set
    aside the lines that are not rows (:func:`repair`), return its rows."""
    path = Path(path)
    check_writable(path)
    repair(path, say)
    return read_rows(path)


def done_keys(rows: Iterable[dict[str, Any]], kind: RowSpec, limit: float | None = None) -> set[str]:
    """The keys (``kind.key_of``) of the rows of ``kind`` that need no new measurement
    (``kind.is_done`` under ``limit``): measured, or skipped or timed out under a limit at
    least as large. Failures are always retried."""
    return {kind.key_of(r) for r in rows if kinds.spec_of(r) is kind and kind.is_done(r, limit)}


def timestamp() -> str:
    """The time stamp every row carries (local time with its UTC offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_run_id() -> str:
    """The id every row of one run carries: its start time and 6 random hex digits."""
    import uuid

    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def outcome_summary(rows: list[dict[str, Any]], what: str) -> tuple[str, bool]:
    """One line counting ``rows`` by status, and whether every one of them failed (none ok,
    at least one timeout, crash, error or oom): the command then exits non-zero."""
    from collections import Counter

    counts = Counter(str(r.get("status")) for r in rows)
    line = f"{len(rows)} {what} this run: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
    failed = sum(counts.get(s, 0) for s in (TIMEOUT, CRASHED, FAILED, OOM))
    return line, bool(rows) and counts.get(OK, 0) == 0 and failed > 0


def to_frame(rows: list[dict[str, Any]]) -> "pd.DataFrame":
    import pandas as pd  # (imported when used: reading and writing rows needs no pandas)

    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # keep the latest row per cell: a rerun that succeeds replaces an old failure
    if "task_key" in frame.columns:
        frame = frame.drop_duplicates(subset=["task_key"], keep="last")
    return frame.reset_index(drop=True)


def export(rows: list[dict[str, Any]], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.json`` (records) of the tidy table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = to_frame(rows)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    flat = frame.copy()
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    flat.to_csv(csv_path, index=False)
    frame.to_json(json_path, orient="records", indent=1)
    return csv_path, json_path


def export_kind(rows: list[dict[str, Any]], out_dir: Path, kind: str) -> tuple[Path, Path]:
    """:func:`export` the rows of one ``kind`` ("init", "loss", "loss_summary") as ``kind.csv/json``."""
    return export([r for r in rows if r.get("kind") == kind], out_dir, kind)
