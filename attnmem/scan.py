"""Scoring a prompt file with a detector, batch by batch, into a resumable JSON-lines file.

This is the job behind ``attnmem scan``; the CLI only parses arguments, the model comes from
:mod:`attnmem.pipelines`, the detector from :mod:`attnmem.detect`. Design points:

**Prompt ids.** A prompt file holds one prompt per line (UTF-8 by default). Blank lines are
skipped and do not count: the id of a prompt is its index among the *non-blank* lines,
starting at 0, so a labels file with one label per non-blank line lines up with it. Leading
and trailing whitespace is removed. Prompt ``id`` gets the seed ``base_seed + id`` wherever and
in whatever batch it runs.

**Batches are id blocks.** Batch k holds the not-yet-done ids among ``k*B … k*B+B-1`` (B =
batch size). A prompt is therefore always scored next to the same neighbours, whether the run
is interrupted and resumed or split over several processes: batched floating-point maths
(which can differ in the last bits with the batch's composition) gives the same numbers.

**Append-only output, resumable** (the file format: :mod:`attnmem.results`). Each finished
batch is appended and made durable, so a killed run loses at most the batch in flight.
``--resume`` skips ids that already have a record without error, retries the failed ones, and
refuses to mix runs (another prompt file, model, metric, settings or seed). When the run ends,
the output is rewritten (atomically) sorted by id with one record per id.

**Failures stay local.** When a batch raises, its prompts are retried one by one; a prompt
that still fails gets a record with ``error`` set and the scan goes on.

**Several processes** (``torchrun --nproc-per-node N -m attnmem scan ...``): rank r takes the
batches k with ``k % world == r``, appends to ``OUT.part-{r}-of-{world}``, and after a barrier
rank 0 merges every part file (and any earlier output) into ``OUT``. Results equal a
one-process run with the same batch size, because seeds and batch blocks depend only on ids.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnmem import detect, results
from attnmem.errors import ScanError
from attnmem.pipelines import DEFAULT_MODEL, load_pipeline, resolve_device, resolve_dtype

__all__ = ["ScanError", "ScanOptions", "ScanSummary", "read_prompts", "run_scan"]

# Ranks may finish far apart (one slow shard); the final barrier must outwait that.
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass
class ScanOptions:
    """Everything ``attnmem scan`` takes. ``layer``/``n`` None = the metric's default."""

    prompts: Path
    out: Path
    model: str = DEFAULT_MODEL
    metric: str = "E"
    batch_size: int = 8
    steps: int = 50
    guidance: float = 7.5
    layer: str | int | None = None
    n: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    resume: bool = False
    limit: int | None = None
    encoding: str = "utf-8"
    progress: bool = True


@dataclass
class ScanSummary:
    """What a scan did. ``scored`` counts all ranks; ``failed`` lists the ids whose final
    record has an error (rank 0 / single process: the merged output; other ranks: their own
    shard)."""

    out: Path
    total: int
    scored: int = 0
    skipped: int = 0
    failed: list[int] = field(default_factory=list)
    rank: int = 0
    world: int = 1


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
    """Rank and world from torchrun's variables; starts a process group when world > 1.

    Only barriers cross processes (results travel through files), so gloo serves on CPU and
    GPU alike: no NCCL communicator and no per-rank device binding are needed for it.
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
# The scan
# ----------------------------------------------------------------------------------------------
def _detector_options(opts: ScanOptions) -> dict[str, Any]:
    """Options for make_detector; None = the metric's default (it rejects what it cannot use)."""
    return {
        "num_inference_steps": opts.steps,
        "guidance_scale": opts.guidance,
        "height": opts.height,
        "width": opts.width,
        "layer": opts.layer,
        "n": opts.n,
    }


def _score(detector: Any, prompts: list[str], seeds: list[int]) -> list[dict[str, Any] | str]:
    """Results of one batch; on failure, prompt by prompt (a result or an error message)."""
    try:
        scored = detector.score_batch(prompts, seeds)
        if len(scored) != len(prompts):
            raise RuntimeError(
                f"detector returned {len(scored)} results for {len(prompts)} prompts"
            )
        return list(scored)
    except Exception as e:
        if len(prompts) == 1:
            return [f"{type(e).__name__}: {e}"]
    return [_score(detector, [p], [s])[0] for p, s in zip(prompts, seeds)]


def _batches(ids: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group ids by block ``id // batch_size`` (see the module docstring)."""
    out: dict[int, list[int]] = {}
    for i in ids:
        out.setdefault(i // batch_size, []).append(i)
    return [out[k] for k in sorted(out)]


def run_scan(opts: ScanOptions, pipe: Any | None = None) -> ScanSummary:
    """Score ``opts.prompts`` into ``opts.out`` (see the module docstring).

    ``pipe``: an already loaded pipeline to use instead of loading ``opts.model`` (the
    record's ``model`` field still says ``opts.model``). Under torchrun each process calls
    this; it starts and ends the process group itself.
    """
    if opts.batch_size < 1:
        raise ScanError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.limit is not None and opts.limit < 1:
        raise ScanError(f"--limit must be >= 1, got {opts.limit}")
    out = Path(opts.out)
    prompts = read_prompts(opts.prompts, opts.encoding)
    n_total = len(prompts) if opts.limit is None else min(opts.limit, len(prompts))

    # Everything is read before the first barrier and written after it, so that every rank
    # sees the same files when deciding what to do.
    if out.is_dir():
        raise ScanError(f"--out {out} is a folder; give a file path such as {out}/results.jsonl")
    parts = results.part_files(out)
    if not opts.resume and ((out.exists() and out.stat().st_size > 0) or parts):
        found = out if out.exists() and out.stat().st_size > 0 else parts[0]
        raise ScanError(
            f"{found} already exists and is not empty: pass --resume to continue that scan, "
            "or choose another --out"
        )
    previous = results.best_records([out, *parts]) if opts.resume else {}

    dist = _dist_from_env()
    try:
        device = resolve_device(opts.device, dist.local_rank)
        dtype = resolve_dtype(opts.dtype, device)
        if pipe is None:
            pipe = load_pipeline(opts.model, device, dtype)
        try:
            detector = detect.make_detector(opts.metric, pipe, **_detector_options(opts))
        except ValueError as e:
            raise ScanError(str(e)) from None
        base = {
            "metric": opts.metric,
            "settings": json.loads(results.dumps(detector.settings())),
            "model": opts.model,
            "dtype": str(dtype).removeprefix("torch."),
        }
        results.check_resume(previous, prompts, base, opts.seed)

        done = {i for i, rec in previous.items() if rec.get("error") is None}
        todo = [i for i in range(n_total) if i not in done]
        batches = [
            b
            for b in _batches(todo, opts.batch_size)
            if (b[0] // opts.batch_size) % dist.world == dist.rank
        ]
        mine = sum(len(b) for b in batches)
        summary = ScanSummary(
            out=out, total=n_total, skipped=len(done), rank=dist.rank, world=dist.world
        )

        dist.barrier()
        target = out if dist.world == 1 else results.part_path(out, dist.rank, dist.world)
        target.parent.mkdir(parents=True, exist_ok=True)
        results.cut_partial_line(target)

        from tqdm import tqdm

        desc = f"{opts.metric} scan" + (f" (rank 0 of {dist.world})" if dist.world > 1 else "")
        bar = tqdm(
            total=mine,
            desc=desc,
            unit="prompt",
            disable=None if opts.progress and dist.rank == 0 else True,  # None: on a TTY
            dynamic_ncols=True,
        )
        failed_here: list[int] = []
        with open(target, "a", encoding="utf-8") as f, bar:
            for ids in batches:
                batch_prompts = [prompts[i] for i in ids]
                seeds = [opts.seed + i for i in ids]
                t0 = time.perf_counter()
                scored = _score(detector, batch_prompts, seeds)
                seconds = (time.perf_counter() - t0) / len(ids)
                recs = [
                    results.make_record(i, prompts[i], opts.seed + i, base, result, seconds)
                    for i, result in zip(ids, scored)
                ]
                failed_here += [rec["id"] for rec in recs if rec["error"] is not None]
                results.append_records(f, recs)
                summary.scored += len(ids)
                bar.update(len(ids))
                if failed_here:
                    bar.set_postfix(failed=len(failed_here))

        summary.scored = dist.total(summary.scored)  # also the barrier before the merge
        if dist.rank == 0:
            records = results.merge_results(out)
            summary.failed = [r["id"] for r in records if r.get("error") is not None]
        else:
            summary.failed = failed_here
        dist.barrier()
        return summary
    finally:
        dist.close()
