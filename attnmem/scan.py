"""Scoring a prompt file with a detector, batch by batch, into a resumable JSON-lines file.

This is the loop behind ``attnmem scan``; the CLI only parses arguments. Design points:

**Prompt ids.** A prompt file holds one prompt per line (UTF-8 by default). Blank lines are
skipped and do not count: the id of a prompt is its index among the *non-blank* lines,
starting at 0, so a labels file with one label per non-blank line lines up with it. Leading
and trailing whitespace is removed. Prompt ``id`` gets the seed ``base_seed + id`` wherever and
in whatever batch it runs.

**Batches are id blocks.** Batch k holds the not-yet-done ids among ``k*B … k*B+B-1`` (B =
batch size). A prompt is therefore always scored next to the same neighbours, whether the run
is interrupted and resumed or split over several processes: batched floating-point maths
(which can differ in the last bits with the batch's composition) gives the same numbers.

**Append-only output, resumable.** Each finished batch is appended as one JSON line per prompt,
flushed and ``fsync``-ed, so a killed run loses at most the batch in flight. A kill in the
middle of a write leaves a partial last line: readers ignore it and ``--resume`` cuts it off
before appending. ``--resume`` skips ids that already have a record without error, retries the
failed ones, and refuses to mix runs (another prompt file, model, metric, settings or seed).
When the run ends, the output is rewritten (atomically) sorted by id with one record per id.

**Failures stay local.** When a batch raises, its prompts are retried one by one; a prompt
that still fails gets a record with ``error`` set and the scan goes on.

**Several processes** (``torchrun --nproc-per-node N -m attnmem scan ...``): rank r takes the
batches k with ``k % world == r``, appends to ``OUT.part-{r}-of-{world}``, and after a barrier
rank 0 merges every part file (and any earlier output) into ``OUT``. Results equal a
one-process run with the same batch size, because seeds and batch blocks depend only on ids.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_MODELS",
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "ScanError",
    "ScanOptions",
    "ScanSummary",
    "read_prompts",
    "read_records",
    "load_pipeline",
    "merge_results",
    "part_files",
    "run_scan",
]

# Built-in model names -> attnmem.testing factories (random weights: their scores demonstrate the
# tooling and mean nothing about memorization).
BUILTIN_MODELS: dict[str, str] = {
    "tiny-sd1": "tiny_sd1_pipeline",
    "tiny-sd2": "tiny_sd2_pipeline",
    "tiny-sdxl": "tiny_sdxl_pipeline",
}
# Trained models shipped inside the package (diffusers folders, safetensors only).
BUNDLED_MODELS: dict[str, Path] = {
    "testbed": Path(__file__).resolve().parent / "data" / "testbed",
}
DEFAULT_MODEL = "testbed"

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Ranks may finish far apart (one slow shard); the final barrier must outwait that.
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)


class ScanError(Exception):
    """A problem the user can fix (bad input file, existing output, bad option)."""


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
# Output files
# ----------------------------------------------------------------------------------------------
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
            raise ScanError(
                f"{path}, line {number}: not a JSON record ({e}); the file is damaged or not "
                "written by attnmem scan. Remove that line, or scan into a new --out."
            ) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), int):
            raise ScanError(f"{path}, line {number}: a results record needs an integer 'id'")
        records.append(rec)
    return records, end


def _best_records(sources: Iterable[Path]) -> dict[int, dict[str, Any]]:
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
    best = _best_records([out, *parts])
    records = [best[i] for i in sorted(best)]
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(_dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    for p in parts:
        p.unlink(missing_ok=True)
    return records


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, default=_json_default)


def _json_default(x: Any) -> Any:
    """numpy / torch scalars and arrays that a detector may return."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


# ----------------------------------------------------------------------------------------------
# Model, device, dtype
# ----------------------------------------------------------------------------------------------
def resolve_device(spec: str, local_rank: int = 0) -> Any:
    """``auto`` = CUDA when available, else CPU; a bare ``cuda`` under torchrun = cuda:LOCAL_RANK."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ScanError(f"--device {spec!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ScanError(f"--device {spec}: no CUDA device is available to this torch")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def resolve_dtype(spec: str, device: Any) -> Any:
    """``auto`` = fp16 on GPU, fp32 otherwise. fp16 on CPU is refused: slow, and some of the
    pipeline's layers have no CPU half kernels."""
    import torch

    if spec == "auto":
        spec = "fp16" if device.type == "cuda" else "fp32"
    if spec not in _DTYPES:
        raise ScanError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {spec!r}")
    if spec == "fp16" and device.type == "cpu":
        raise ScanError("--dtype fp16 is not supported on CPU; use fp32 (or bf16)")
    return getattr(torch, _DTYPES[spec])


def load_pipeline(model: str, device: Any, dtype: Any) -> Any:
    """A diffusers pipeline from a built-in name, a local folder or a hub id.

    Folders and hub ids load with ``use_safetensors=True`` (no pickle) and
    ``trust_remote_code=False`` (no code from the model repository). A safety checker is not
    loaded: it is not needed to score, and it would replace flagged images by black ones,
    which an image-similarity detector (carlini) would read as memorized.
    """
    import torch

    if model in BUILTIN_MODELS:
        from attnmem import testing

        pipe = getattr(testing, BUILTIN_MODELS[model])()
        if dtype != torch.float32:  # built in fp32; casting to fp32 again only warns
            pipe = pipe.to(dtype=dtype)
    elif model in BUNDLED_MODELS:
        folder = BUNDLED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise ScanError(f"--model {model}: the bundled model is missing from {folder}")
        pipe = _from_pretrained(str(folder), dtype)
    else:
        pipe = _from_pretrained(model, dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dtype_keyword() -> str:
    """diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (PR #14205); older
    versions ignore an unknown ``dtype``, newer ones deprecate ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Turn diffusers' and transformers' loading progress bars off, then restore them."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _from_pretrained(model: str, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ScanError(
                f"--model {model}: this folder is not a diffusers pipeline (no model_index.json)"
            )
        model = str(local)
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ScanError(
            f"--model {model}: no such folder (and not a hub id 'owner/name'); "
            f"built-in names: {', '.join([*BUNDLED_MODELS, *BUILTIN_MODELS])}"
        )
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": False,
        _dtype_keyword(): dtype,
    }
    try:
        config = DiffusionPipeline.load_config(model)
        if "safety_checker" in config:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        quiet = contextlib.nullcontext()
        if local.exists():  # a local folder loads in a second: no bars, no accelerate advice
            import importlib.util

            if importlib.util.find_spec("accelerate") is None:
                kwargs["low_cpu_mem_usage"] = False
            quiet = _quiet_progress_bars()
        with quiet:
            return DiffusionPipeline.from_pretrained(model, **kwargs)
    except ScanError:
        raise
    except Exception as e:
        raise ScanError(
            f"--model {model}: could not load a diffusers pipeline ({type(e).__name__}: {e}). "
            "It must be a local diffusers folder or a reachable hub id with .safetensors weights."
        ) from e


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
def _check_resume(
    previous: dict[int, dict[str, Any]], prompts: Sequence[str], expect: dict[str, Any], seed: int
) -> None:
    """Refuse to append to results made from other prompts or with other settings."""
    for i, rec in sorted(previous.items()):
        if not 0 <= i < len(prompts) or rec.get("prompt") != prompts[i]:
            raise ScanError(
                f"cannot resume: the existing results hold id {i} = {rec.get('prompt')!r}, "
                "which is not that line of this prompt file; scan into a new --out"
            )
        for key, value in expect.items():
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
        results = detector.score_batch(prompts, seeds)
        if len(results) != len(prompts):
            raise RuntimeError(
                f"detector returned {len(results)} results for {len(prompts)} prompts"
            )
        return list(results)
    except Exception as e:
        if len(prompts) == 1:
            return [f"{type(e).__name__}: {e}"]
    return [_score(detector, [p], [s])[0] for p, s in zip(prompts, seeds)]


_RESULT_KEYS = (
    "score",
    "L",
    "truncated",
    "tokens",
    "attention",
    "triggers",
    "entropy_steps",
    "forwards",
)


def _record(
    i: int, prompt: str, seed: int, base: dict[str, Any], result: dict | str, seconds: float
) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": i, "prompt": prompt, "seed": seed, **base}
    error = result if isinstance(result, str) else None
    values = {} if isinstance(result, str) else result
    for key in _RESULT_KEYS:
        rec[key] = values.get(key)
    rec["triggers"] = rec["triggers"] or []
    score = rec["score"]
    if error is None and (score is None or not math.isfinite(float(score))):
        error, rec["score"] = f"the detector returned a non-finite score ({score})", None
    rec["seconds"] = round(seconds, 6)
    rec["error"] = error
    return rec


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
    parts = part_files(out)
    if not opts.resume and ((out.exists() and out.stat().st_size > 0) or parts):
        found = out if out.exists() and out.stat().st_size > 0 else parts[0]
        raise ScanError(
            f"{found} already exists and is not empty: pass --resume to continue that scan, "
            "or choose another --out"
        )
    previous = _best_records([out, *parts]) if opts.resume else {}

    dist = _dist_from_env()
    try:
        from attnmem import detect

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
            "settings": json.loads(_dumps(detector.settings())),
            "model": opts.model,
            "dtype": str(dtype).removeprefix("torch."),
        }
        _check_resume(previous, prompts, base, opts.seed)

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
        target = out if dist.world == 1 else part_path(out, dist.rank, dist.world)
        target.parent.mkdir(parents=True, exist_ok=True)
        _cut_partial_line(target)

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
                results = _score(detector, batch_prompts, seeds)
                seconds = (time.perf_counter() - t0) / len(ids)
                for i, result in zip(ids, results):
                    rec = _record(i, prompts[i], opts.seed + i, base, result, seconds)
                    if rec["error"] is not None:
                        failed_here.append(i)
                    f.write(_dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                summary.scored += len(ids)
                bar.update(len(ids))
                if failed_here:
                    bar.set_postfix(failed=len(failed_here))

        summary.scored = dist.total(summary.scored)  # also the barrier before the merge
        if dist.rank == 0:
            records = merge_results(out)
            summary.failed = [r["id"] for r in records if r.get("error") is not None]
        else:
            summary.failed = failed_here
        dist.barrier()
        return summary
    finally:
        dist.close()


def _cut_partial_line(path: Path) -> None:
    """Drop a partial last line (left by a kill during a write) before appending."""
    if not path.exists():
        return
    _, end = read_records(path)
    if end < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
