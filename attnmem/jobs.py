"""A job over a prompt file, batch by batch, into a resumable JSON-lines results file: what
``attnmem scan`` and ``attnmem generate`` share. The file format is :mod:`attnmem.results`.

**Prompt ids.** A prompt file holds one prompt per line (UTF-8 by default). Blank lines are
skipped and do not count: the id of a prompt is its index among the *non-blank* lines,
starting at 0, so a labels file with one label per non-blank line lines up with it. Leading
and trailing whitespace is removed. Prompt ``id`` gets the seed ``base_seed + id`` wherever and
in whatever batch it runs.

**Batches are id blocks.** Batch k holds the not-yet-done ids among ``k*B … k*B+B-1`` (B =
batch size). A prompt is therefore always processed next to the same neighbours, whether the
run is interrupted and resumed or split over several processes: batched floating-point maths
(which can differ in the last bits with the batch's composition) gives the same numbers.

**One job per output.** A job holds an exclusive lock on ``OUT.lock`` (:class:`attnmem.results.
OutputLock`) from before it reads the output until it has verified the merged result; a second
job on the same output stops at once with an error naming the first (pid, host, start), and
``attnmem status OUT`` shows a running job's progress without touching its files.

**Append-only output, resumable.** Each finished batch is appended and made durable, so a
killed run loses at most the batch in flight. ``--resume`` skips ids that already have a
record without error, retries the failed ones, and refuses to mix runs (another prompt file,
model, settings or seed). When the run ends, the output is rewritten (atomically) sorted by id
with one record per id, then read back: every id of the run must be there, or the job fails
instead of reporting success.

**Failures stay local.** When a batch raises, its prompts are retried one by one; a prompt
that still fails gets a record with ``error`` set and the job goes on.

**Several processes** (``torchrun`` or ``accelerate launch``): rank r takes the batches k with
``k % world == r``, appends to ``OUT.part-{r}-of-{world}``, and after a barrier rank 0 merges
every part file (and any earlier output) into ``OUT``. Results equal a one-process run with the
same batch size, because seeds and batch blocks depend only on ids.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnmem import results
from attnmem.console import Progress, count_unet_calls
from attnmem.errors import ScanError

__all__ = ["Job", "JobRun", "JobSummary", "read_prompts", "run_job"]

# Ranks may finish far apart (one slow shard); the final barrier must outwait that.
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike, encoding: str = "utf-8") -> list[str]:
    """Non-blank lines of a prompt file, stripped; list index = prompt id.

    Raises ScanError naming the file (and, for undecodable bytes, the byte offset and line)
    when the file is missing, cannot be decoded, or holds no prompt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScanError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        text = data.decode(codec)
    except LookupError:
        raise ScanError(f"unknown --encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ScanError(
            f"{path}: not valid {encoding} at byte offset {e.start} (line {line}): {e.reason}. "
            "Convert the file to UTF-8, or name its encoding with --encoding (e.g. --encoding latin-1)."
        ) from None
    prompts = [line.strip() for line in text.split("\n")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ScanError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    return prompts


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def total(self, n: int) -> int:
        """Sum of ``n`` over all ranks."""
        if self.world == 1:
            return n
        import torch
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _dist_from_env() -> _Dist:
    """Rank and world from the launcher's variables (torchrun and ``accelerate launch`` set the
    same ones: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); starts a process group
    when world > 1.

    Only barriers and counts cross processes (results travel through files), so gloo serves on
    CPU and GPU alike: no NCCL communicator and no per-rank device binding are needed for it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="gloo", timeout=_BARRIER_TIMEOUT)
    return _Dist(rank=rank, world=world, local_rank=local_rank, owns_group=owns)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """What every job takes: the prompt file, the output, how to batch and seed, and how much to
    print. ``name`` names the command in messages (``scan``, ``generate``)."""

    name: str
    prompts: Path
    out: Path
    batch_size: int = 8
    seed: int = 0
    resume: bool = False
    limit: int | None = None
    encoding: str = "utf-8"
    progress: bool = True


@dataclass
class JobRun:
    """What a job does once its model is loaded (returned by the job's ``prepare``).

    base: the fields every record of this run has (model, settings, ...); ``--resume`` refuses
        a file whose records differ in any of them.
    process: ``(ids, prompts, seeds) -> results``, one per prompt, each the value to record or
        the error message (str) of a failed prompt; may raise (the batch is then retried one
        prompt at a time).
    record: ``(id, prompt, seed, result, seconds) -> record`` (a dict with ``error``).
    pipe: the pipeline, whose UNet calls are counted for per-step progress (or None).
    steps: UNet calls per batch, for the progress display (None: unknown).
    """

    base: dict[str, Any]
    process: Callable[[list[int], list[str], list[int]], list[Any]]
    record: Callable[[int, str, int, Any, float], dict[str, Any]]
    pipe: Any = None
    steps: int | None = None


@dataclass
class JobSummary:
    """What a job did. ``done`` counts all ranks; ``failed`` lists the ids whose final record
    has an error (rank 0 / single process: the merged output; other ranks: their own shard)."""

    out: Path
    total: int
    done: int = 0
    skipped: int = 0
    failed: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world: int = 1


def _process(run: JobRun, ids: list[int], prompts: list[str], seeds: list[int]) -> list[Any]:
    """Results of one batch; on failure, prompt by prompt (a result or an error message)."""
    try:
        out = run.process(ids, prompts, seeds)
        if len(out) != len(prompts):
            raise RuntimeError(f"got {len(out)} results for {len(prompts)} prompts")
        return list(out)
    except Exception as e:
        if len(prompts) == 1:
            return [f"{type(e).__name__}: {e}"]
    return [_process(run, [i], [p], [s])[0] for i, p, s in zip(ids, prompts, seeds)]


def _batches(ids: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group ids by block ``id // batch_size`` (see the module docstring)."""
    out: dict[int, list[int]] = {}
    for i in ids:
        out.setdefault(i // batch_size, []).append(i)
    return [out[k] for k in sorted(out)]


def _disk_error(e: OSError, path: Path) -> ScanError:
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return ScanError(
        f"cannot write {path}: {why}. The records written so far are kept; free space (or "
        "choose another --out) and rerun with --resume to continue."
    )


def _check_out(out: Path) -> None:
    """Refuse an output that cannot be written, before any model is loaded."""
    if out.is_dir():
        raise ScanError(f"--out {out} is a folder; give a file path such as {out}/results.jsonl")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScanError(
            f"--out {out}: cannot create the folder {out.parent}: {e.strerror or e}"
        ) from None
    # Writing is tried for real by the lock (OUT.lock is created next to OUT) before loading.


def _lock_info(job: Job, n_total: int, world: int) -> dict[str, Any]:
    """What the lock file tells ``attnmem status`` and a second job about this one."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "command": job.name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": now.isoformat(timespec="seconds"),
        "processes": world,
        "total": n_total,
        "prompts": str(job.prompts),
    }


def run_job(job: Job, prepare: Callable[[int], JobRun]) -> JobSummary:
    """Run ``job`` (see the module docstring). ``prepare(local_rank)`` loads the model and
    returns the :class:`JobRun`; it runs after the output is checked and locked, so a bad or
    busy output fails before anything is loaded. Under torchrun each process calls this; it
    starts and ends the process group itself."""
    if job.batch_size < 1:
        raise ScanError(f"--batch-size must be >= 1, got {job.batch_size}")
    if job.limit is not None and job.limit < 1:
        raise ScanError(f"--limit must be >= 1, got {job.limit}")
    out = Path(job.out)
    prompts = read_prompts(job.prompts, job.encoding)
    n_total = len(prompts) if job.limit is None else min(job.limit, len(prompts))
    _check_out(out)

    dist = _dist_from_env()
    lock = None
    try:
        # Rank 0 locks the output for the whole run; every rank learns whether it could.
        busy: ScanError | None = None
        if dist.rank == 0:
            lock = results.OutputLock(out, _lock_info(job, n_total, dist.world))
            try:
                lock.acquire()
            except ScanError as e:
                if dist.world == 1:
                    raise
                busy, lock = e, None
        if dist.world > 1 and dist.total(0 if busy is not None else 1) < dist.world:
            if busy is not None:
                raise busy
            raise ScanError(f"{out} is in use by another job (see rank 0's message)")

        # Everything is read after the lock and before the first barrier, and written after
        # it, so that every rank sees the same files when deciding what to do.
        parts = results.part_files(out)
        if not job.resume and ((out.exists() and out.stat().st_size > 0) or parts):
            found = out if out.exists() and out.stat().st_size > 0 else parts[0]
            raise ScanError(
                f"{found} already exists and is not empty: pass --resume to continue that "
                f"{job.name}, or choose another --out"
            )
        previous = results.best_records([out, *parts]) if job.resume else {}

        run = prepare(dist.local_rank)
        results.check_resume(previous, prompts, run.base, job.seed)

        done = {i for i, rec in previous.items() if rec.get("error") is None}
        todo = [i for i in range(n_total) if i not in done]
        batches = [
            b
            for b in _batches(todo, job.batch_size)
            if (b[0] // job.batch_size) % dist.world == dist.rank
        ]
        summary = JobSummary(
            out=out, total=n_total, skipped=len(done), rank=dist.rank, world=dist.world
        )

        dist.barrier()
        target = out if dist.world == 1 else results.part_path(out, dist.rank, dist.world)
        results.cut_partial_line(target)

        desc = f"attnmem {job.name}" + (f" (rank 0 of {dist.world})" if dist.world > 1 else "")
        progress = Progress(
            sum(len(b) for b in batches), desc, enabled=job.progress and dist.rank == 0
        )
        failed_here: list[int] = []
        try:
            f = open(target, "a", encoding="utf-8")
        except OSError as e:
            raise _disk_error(e, target) from None
        with (
            f,
            progress,
            count_unet_calls(run.pipe, lambda k: progress.step(k, run.steps)) as restart,
        ):
            for ids in batches:
                restart()
                batch_prompts = [prompts[i] for i in ids]
                seeds = [job.seed + i for i in ids]
                t0 = time.perf_counter()
                values = _process(run, ids, batch_prompts, seeds)
                seconds = (time.perf_counter() - t0) / len(ids)
                recs = [
                    run.record(i, prompts[i], job.seed + i, value, seconds)
                    for i, value in zip(ids, values)
                ]
                bad = [rec["id"] for rec in recs if rec["error"] is not None]
                failed_here += bad
                try:
                    results.append_records(f, recs)
                except OSError as e:
                    raise _disk_error(e, target) from None
                summary.done += len(ids)
                progress.update(len(ids), failed=len(bad))

        summary.done = dist.total(summary.done)  # also the barrier before the merge
        if dist.rank == 0:
            try:
                records = results.merge_results(out)
            except OSError as e:
                raise _disk_error(e, out) from None
            results.verify_merged(out, range(n_total), records)
            summary.records = records
            summary.failed = [r["id"] for r in records if r.get("error") is not None]
        else:
            summary.failed = failed_here
        dist.barrier()
        return summary
    finally:
        if lock is not None:
            lock.release()
        dist.close()
