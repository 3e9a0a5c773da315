"""Scoring a prompt file with a detector: the job behind ``attnmem scan``.

The CLI only parses arguments; the model comes from :mod:`attnmem.pipelines`, the detector from
:mod:`attnmem.detect`, and everything about the job itself (prompt ids, id-block batches, the
output lock, resume, per-prompt failures, torchrun sharding, the merge and its verification)
from :mod:`attnmem.jobs`. Each prompt becomes one record of :mod:`attnmem.results`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnmem import detect, results
from attnmem.errors import ScanError
from attnmem.jobs import Job, JobRun, JobSummary, read_prompts, run_job
from attnmem.pipelines import DEFAULT_MODEL, load_pipeline, resolve_device, resolve_dtype

__all__ = ["ScanError", "ScanOptions", "read_prompts", "run_scan"]


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


def run_scan(opts: ScanOptions, pipe: Any | None = None) -> JobSummary:
    """Score ``opts.prompts`` into ``opts.out`` (see the module docstring).

    ``pipe``: an already loaded pipeline to use instead of loading ``opts.model`` (the
    record's ``model`` field still says ``opts.model``). Under torchrun each process calls
    this; it starts and ends the process group itself.
    """
    job = Job(
        name="scan",
        prompts=opts.prompts,
        out=opts.out,
        batch_size=opts.batch_size,
        seed=opts.seed,
        resume=opts.resume,
        limit=opts.limit,
        encoding=opts.encoding,
        progress=opts.progress,
    )

    def prepare(local_rank: int) -> JobRun:
        nonlocal pipe
        device = resolve_device(opts.device, local_rank)
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

        def record(i: int, prompt: str, seed: int, result: Any, seconds: float) -> dict:
            return results.make_record(i, prompt, seed, base, result, seconds)

        return JobRun(
            base=base,
            process=lambda ids, prompts, seeds: detector.score_batch(prompts, seeds),
            record=record,
            pipe=pipe,
            steps=detector.unet_calls(),
        )

    return run_job(job, prepare)
