"""The results file of ``attnmem scan``: JSON lines, one record per prompt, append-only and
resumable.

**A record** is one JSON object per line: ``id`` (the prompt's index among the non-blank lines
of the prompt file), ``prompt``, ``seed``, the run's ``metric``, ``settings``, ``model`` and
``dtype`` (and ``noise`` when the starting noise came from the caller, not from the seeds), the
detector's result fields (:data:`RESULT_FIELDS`, the schema of
:class:`attnmem.detect.DetectionResult`: ``score``, ``L``, ``truncated``, ``tokens``,
``attention``, ``triggers``, ``entropy_steps``, ``forwards``, ``jvps``, ``backwards``,
``components``), ``seconds`` and ``error`` (None,
or the message of a prompt that failed).

**Append-only, resumable.** Each finished batch is appended, flushed and ``fsync``-ed
(:func:`append_records`), so a killed run loses at most the batch in flight. A kill in the
middle of a write leaves a partial last line: readers ignore it and a resumed scan cuts it off
(:func:`cut_partial_line`) before appending. :func:`check_resume` refuses to mix runs. When a
run ends the file is rewritten atomically, sorted by id with one record per id
(:func:`merge_results`); for an id present more than once a record without error wins
(:func:`best_records`).

**Part files.** Under torchrun, rank r of a world of N appends to ``OUT.part-r-of-N``
(:func:`part_path`); :func:`merge_results` folds every part file (:func:`part_files`) into OUT.

**One writer.** A job holds :class:`OutputLock` (``flock`` on ``OUT.lock``) while it reads,
appends and merges; :func:`lock_holder` tells whether a job holds it and what the job wrote
there (command, pid, host, start, total), without disturbing it. After the merge,
:func:`verify_merged` reads the file back and fails when an id of the run is missing (a writer
that ignored the lock), so a job never reports success over lost records.

**Strict JSON.** Records never hold ``NaN`` or ``Infinity`` (which standard JSON parsers
reject): :func:`dumps` writes non-finite floats as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from attnmem.detect.base import RESULT_FIELDS
from attnmem.errors import ResultsError, ScanError

__all__ = [
    "RESULT_FIELDS",
    "make_record",
    "dumps",
    "append_records",
    "read_records",
    "best_records",
    "merge_results",
    "check_resume",
    "cut_partial_line",
    "part_path",
    "part_files",
    "OutputLock",
    "lock_path",
    "lock_holder",
    "verify_merged",
]


def make_record(
    i: int, prompt: str, seed: int, base: dict[str, Any], result: Mapping | str, seconds: float
) -> dict[str, Any]:
    """The results line of prompt ``i``: id, prompt, seed, the run's ``base`` fields (metric,
    settings, model, dtype), the detector's result fields (:data:`RESULT_FIELDS`), seconds and
    error. ``result`` is a detector result or the error message of a failed prompt; a
    non-finite score is recorded as an error."""
    rec: dict[str, Any] = {"id": i, "prompt": prompt, "seed": seed, **base}
    error = result if isinstance(result, str) else None
    values = {} if isinstance(result, str) else result
    for key in RESULT_FIELDS:
        rec[key] = values.get(key)
    rec["triggers"] = rec["triggers"] or []
    score = rec["score"]
    if error is None and (score is None or not math.isfinite(float(score))):
        error, rec["score"] = f"the detector returned a non-finite score ({score})", None
    rec["seconds"] = round(seconds, 6)
    rec["error"] = error
    return rec


def part_path(out: Path, rank: int, world: int) -> Path:
    """The file rank ``rank`` of ``world`` appends to."""
    return out.with_name(f"{out.name}.part-{rank}-of-{world}")


def part_files(out: Path) -> list[Path]:
    """Part files of ``out`` left by any run (any world size), sorted by name."""
    return sorted(out.parent.glob(f"{_glob_escape(out.name)}.part-*-of-*"))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines results file and the byte length of its complete lines.

    A last line without its newline is what a kill in the middle of a write leaves: it is
    ignored (the returned length stops before it, so the writer can cut it off). Any other
    line that is not a JSON record is an error naming the line: the file was edited or is
    not an attnmem results file, and guessing would lose or duplicate prompts.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1  # complete lines end here; 0 when there is none
    records = []
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResultsError(
                f"{path}, line {number}: not a JSON record ({e}); the file is damaged or not "
                "written by attnmem scan. Remove that line, or scan into a new --out."
            ) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), int):
            raise ResultsError(f"{path}, line {number}: a results record needs an integer 'id'")
        records.append(rec)
    return records, end


def best_records(sources: Iterable[Path]) -> dict[int, dict[str, Any]]:
    """One record per id: a record without error beats one with; otherwise the later wins."""
    best: dict[int, dict[str, Any]] = {}
    for src in sources:
        for rec in read_records(src)[0]:
            prev = best.get(rec["id"])
            if prev is None or prev.get("error") is not None:
                best[rec["id"]] = rec
    return best


def merge_results(out: Path) -> list[dict[str, Any]]:
    """Rewrite ``out`` from itself and its part files: sorted by id, one record per id.

    The new file is written next to ``out`` and renamed over it, so a kill leaves either the
    old file and parts or the new file; the parts are deleted only after the rename.
    """
    parts = part_files(out)
    best = best_records([out, *parts])
    records = [best[i] for i in sorted(best)]
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    for p in parts:
        p.unlink(missing_ok=True)
    return records


def dumps(rec: dict[str, Any]) -> str:
    """One record as a JSON line (without the newline); numpy / torch values become lists,
    non-finite floats ``null`` (standard JSON has no NaN)."""
    return json.dumps(_finite(rec), ensure_ascii=False, allow_nan=False)


def _finite(x: Any) -> Any:
    """``x`` with numpy / torch values as Python ones and non-finite floats as None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return _finite(x.tolist())
    if hasattr(x, "item"):
        return _finite(x.item())
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def append_records(f: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """Append records to an open results file and make them durable (flush + fsync)."""
    for rec in records:
        f.write(dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


def check_resume(
    previous: dict[int, dict[str, Any]], prompts: Sequence[str], expect: dict[str, Any], seed: int
) -> None:
    """Refuse to append to results made from other prompts or with other settings.

    ``previous``: id -> record already in the file; ``expect``: the fields every record of this
    run has (metric, settings, model, dtype); prompt id i has seed ``seed + i``.
    """
    for i, rec in sorted(previous.items()):
        if not 0 <= i < len(prompts) or rec.get("prompt") != prompts[i]:
            raise ScanError(
                f"cannot resume: the existing results hold id {i} = {rec.get('prompt')!r}, "
                "which is not that line of this prompt file; scan into a new --out"
            )
        for key in {**expect, "noise": None}:
            value = expect.get(key)
            if rec.get(key) != value:
                raise ScanError(
                    f"cannot resume: the existing results (id {i}) were made with {key}="
                    f"{rec.get(key)!r}, this run has {value!r}; use the same options or a new --out"
                )
        if rec.get("seed") != seed + i:
            raise ScanError(
                f"cannot resume: id {i} was scored with seed {rec.get('seed')}, this run "
                f"would use {seed + i} (--seed {seed}); use the same --seed or a new --out"
            )


def cut_partial_line(path: Path) -> None:
    """Drop a partial last line (left by a kill during a write) before appending."""
    if not path.exists():
        return
    _, end = read_records(path)
    if end < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# One writer at a time
# ----------------------------------------------------------------------------------------------
def lock_path(out: Path) -> Path:
    """The lock file of results file ``out``."""
    return out.with_name(out.name + ".lock")


class OutputLock:
    """Exclusive lock on a results file for the whole of a job: ``flock(2)`` on ``OUT.lock``.

    The kernel drops the lock when the process dies (even by ``kill -9``), so a killed job never
    blocks its ``--resume``; a lock file left behind by one is stale and taken over. ``info``
    (JSON) is written into the lock file for :func:`lock_holder` and for the error a second job
    gets. Where ``fcntl`` does not exist (Windows) there is no lock.
    """

    def __init__(self, out: Path, info: dict[str, Any]):
        self.path = lock_path(Path(out))
        self.out = Path(out)
        self.info = info
        self._fd: int | None = None

    def acquire(self, wait: float = 1.0) -> None:
        """Take the lock, or raise :class:`ScanError` naming the job that holds it. ``wait``:
        seconds to retry first (``attnmem status`` may hold a shared lock for an instant)."""
        try:
            import fcntl
        except ImportError:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ScanError(
                    f"--out {self.out}: cannot create {self.path.name} in {self.path.parent}: "
                    f"{e.strerror or e}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise ScanError(self._busy_message()) from None
            # The holder before us may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else can see; start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(self.info) + "\n").encode("utf-8"))
            self._fd = fd
            return

    def _busy_message(self) -> str:
        who = lock_holder(self.out) or {}
        what = f"attnmem {who.get('command', 'job')}"
        if who.get("pid"):
            what += (
                f" (pid {who['pid']} on {who.get('host', '?')}, started {who.get('started', '?')})"
            )
        return (
            f"{self.out} is being written by another {what}; two jobs on one output would lose "
            f"records. Wait for it to finish (attnmem status {self.out} shows its progress), "
            "or choose another --out."
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (harmless when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: see acquire
        os.close(self._fd)
        self._fd = None


def lock_holder(out: Path) -> dict[str, Any] | None:
    """What the job holding ``out``'s lock wrote into the lock file, or None when no job holds
    it (no lock file, or a stale one left by a killed job)."""
    path = lock_path(Path(out))
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.read(fd, 1 << 16)
            try:
                info = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def verify_merged(out: Path, ids: Iterable[int], written: Sequence[dict[str, Any]]) -> None:
    """Read ``out`` back after a merge: it must hold exactly the ``written`` records and a
    record for every id in ``ids``; otherwise raise :class:`ScanError` naming the missing ids."""
    on_disk, _ = read_records(out)
    found = {r["id"] for r in on_disk}
    missing = [i for i in ids if i not in found]
    if missing or len(on_disk) != len(written):
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ScanError(
            f"{out} lost records while this job ran: {len(on_disk)} records on disk, "
            f"{len(written)} written"
            + (f", no record for ids {shown}" if missing else "")
            + ". Something else wrote to the file (another job ignoring its lock, or an "
            "editor); rerun with --resume to redo the missing ids."
        )
