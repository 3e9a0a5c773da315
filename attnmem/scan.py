"""Scoring a prompt file with a detector: the job behind ``attnmem scan``.

The CLI only parses arguments; the model comes from :mod:`attnmem.pipelines`, the detector from
:mod:`attnmem.detect`, and everything about the job itself (prompt ids, id-block batches, the
output lock, resume, per-prompt failures, torchrun sharding, the merge and its verification)
from :mod:`attnmem.jobs`. Each prompt becomes one record of :mod:`attnmem.results`.

**Starting noise.** By default prompt ``id`` gets the seed ``base_seed + id`` and generation j
of it the CPU generator seeded ``1000 (base_seed + id) + j`` (:mod:`attnmem.detect.base`). To
reproduce another code base's scores, pass the noise per prompt id instead: ``latents``
(``--latents FILE``: a tensor of shape ``(prompts, n, C, h, w)`` or ``(prompts x n, C, h, w)``,
prompt-major, indexed by prompt id) or, from Python, ``generator``: one ``torch.Generator`` per
prompt id (its n latents drawn from it in one call) or one per generation (``id x n + j``). A
generator is never consumed: each batch, and each retry, draws from a copy of its state, so
batching, retries and resumes see the same noise. The records then name the noise source
(``noise``), and a resumed scan must use the same one.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnmem import detect, results
from attnmem.errors import ScanError
from attnmem.jobs import Job, JobRun, JobSummary, read_prompts, run_job
from attnmem.pipelines import (
    DEFAULT_MODEL,
    LoadOptions,
    check_job_pipeline,
    load_pipeline,
    model_calibration,
    resolve_device,
    resolve_dtype,
)

__all__ = ["ScanError", "ScanOptions", "calibration_for", "read_prompts", "run_scan"]


@dataclass
class ScanOptions:
    """Everything ``attnmem scan`` takes. ``layer``/``n`` None = the metric's default;
    ``calibration``: metric E's calibration file (:mod:`attnmem.detect.calibration`), None = the
    model folder's own if it has one (see :func:`calibration_for`);
    ``latents``: a tensor file of starting noise per prompt id (module docstring);
    ``options``: further detector options by name (``--option KEY=VALUE``)."""

    prompts: Path
    out: Path
    model: str = DEFAULT_MODEL
    metric: str = "E"
    batch_size: int = 8
    steps: int = 50
    guidance: float = 7.5
    layer: str | int | None = None
    calibration: Path | None = None
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
    load: LoadOptions = field(default_factory=LoadOptions)
    latents: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


def calibration_for(opts: ScanOptions) -> Path | None:
    """The calibration file metric E reads its layer from: ``opts.calibration``, else (when no
    ``layer`` is given) the model folder's :data:`~attnmem.detect.CALIBRATION_FILE`, if any.
    :func:`run_scan` reads it once, before the model loads."""
    if opts.calibration is not None:
        if opts.metric != "E":
            raise ScanError(f"--calibration is for metric E, not {opts.metric}")
        return Path(opts.calibration)
    if opts.metric == "E" and opts.layer is None:
        return model_calibration(opts.model)
    return None


def _detector_options(opts: ScanOptions, calibration: detect.Calibration | None) -> dict[str, Any]:
    """Options for make_detector; None = the metric's default (it rejects what it cannot use)."""
    return {
        **opts.options,
        "num_inference_steps": opts.steps,
        "guidance_scale": opts.guidance,
        "height": opts.height,
        "width": opts.width,
        "layer": opts.layer,
        "calibration": calibration,
        "n": opts.n,
    }


def load_latents(path: str | os.PathLike) -> torch.Tensor:
    """A tensor of starting noise from a ``torch.save`` file (loaded with ``weights_only``)."""
    try:
        t = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ScanError(f"--latents {path}: cannot load a tensor ({e})") from None
    if not isinstance(t, torch.Tensor):
        raise ScanError(f"--latents {path}: holds a {type(t).__name__}, not a tensor")
    return t


@dataclass
class _Noise:
    """The caller's starting noise per prompt id (module docstring), sliced per batch."""

    n: int
    n_prompts: int
    generator: Sequence[torch.Generator] | None = None
    latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.generator is not None and self.latents is not None:
            raise ScanError("pass generator or latents, not both")
        if self.latents is not None:
            lat = self.latents
            if lat.ndim == 4 and lat.shape[0] == self.n_prompts * self.n:
                lat = lat.view(self.n_prompts, self.n, *lat.shape[1:])
            if lat.ndim != 5 or tuple(lat.shape[:2]) != (self.n_prompts, self.n):
                raise ScanError(
                    f"latents of shape {tuple(self.latents.shape)} do not fit {self.n_prompts} "
                    f"prompts x {self.n} generations: give (prompts, n, C, h, w) or "
                    "(prompts x n, C, h, w), indexed by prompt id"
                )
            self.latents = lat
        if self.generator is not None:
            self.generator = list(self.generator)
            if len(self.generator) not in (self.n_prompts, self.n_prompts * self.n):
                raise ScanError(
                    f"got {len(self.generator)} generators for {self.n_prompts} prompts x "
                    f"{self.n} generations: give one per prompt id or one per generation"
                )

    def describe(self) -> str | None:
        """The ``noise`` field of the records (None: the seeding rule)."""
        if self.latents is not None:
            import hashlib

            digest = hashlib.sha256(self.latents.float().contiguous().numpy().tobytes())
            return f"latents sha256:{digest.hexdigest()[:16]}"
        if self.generator is not None:
            return "generator"
        return None

    def kwargs(self, ids: Sequence[int]) -> dict[str, Any]:
        """``generator=`` / ``latents=`` for these prompt ids (copies: the originals stay unused)."""
        if self.latents is not None:
            return {"latents": self.latents[list(ids)].flatten(0, 1)}
        if self.generator is not None:
            per = 1 if len(self.generator) == self.n_prompts else self.n
            return {
                "generator": [_copy(self.generator[i * per + j]) for i in ids for j in range(per)]
            }
        return {}


def _copy(g: torch.Generator) -> torch.Generator:
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


def run_scan(
    opts: ScanOptions,
    pipe: Any | None = None,
    *,
    generator: Sequence[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
) -> JobSummary:
    """Score ``opts.prompts`` into ``opts.out`` (see the module docstring).

    ``pipe``: an already loaded pipeline to use instead of loading ``opts.model`` (the
    record's ``model`` field still says ``opts.model``). ``generator`` / ``latents``: the
    starting noise per prompt id instead of the seeding rule (module docstring; ``latents``
    overrides ``opts.latents``). Under torchrun each process calls this; it starts and ends
    the process group itself.
    """
    cal_file = calibration_for(opts)  # read now: a bad file fails before the model loads
    calibration = None if cal_file is None else detect.Calibration.load(cal_file)
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
            pipe = load_pipeline(opts.model, device, dtype, opts.load)
        check_job_pipeline(pipe, opts.model)
        try:
            detector = detect.make_detector(
                opts.metric, pipe, **_detector_options(opts, calibration)
            )
        except ValueError as e:
            raise ScanError(str(e)) from None
        lat = latents if latents is not None or opts.latents is None else load_latents(opts.latents)
        noise = _Noise(
            detector.generations, len(read_prompts(opts.prompts, opts.encoding)), generator, lat
        )
        base = {
            "n_prompts": len(read_prompts(opts.prompts, opts.encoding)),
            "metric": opts.metric,
            "settings": json.loads(results.dumps(detector.settings())),
            "model": opts.model,
            "dtype": str(dtype).removeprefix("torch."),
        }
        if noise.describe() is not None:
            base["noise"] = noise.describe()
        if opts.load.describe() is not None:
            base["load"] = opts.load.describe()

        def record(i: int, prompt: str, seed: int, result: Any, seconds: float) -> dict:
            return results.make_record(i, prompt, seed, base, result, seconds)

        def process(ids: list[int], prompts: list[str], seeds: list[int]) -> list[Any]:
            # Truncation is recorded per prompt and counted at the end, not warned per batch.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"attnmem: prompts .* truncated")
                kw = noise.kwargs(ids)
                return detector.score_batch(prompts, None if kw else seeds, **kw)

        return JobRun(
            base=base,
            process=process,
            record=record,
            pipe=pipe,
            steps=detector.unet_calls(),
        )

    return run_job(job, prepare)
