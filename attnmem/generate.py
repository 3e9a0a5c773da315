"""Plain and mitigated images side by side: the job behind ``attnmem generate``.

For every prompt of a prompt file, generation j (of ``n``) is made twice from the same starting
noise (seed ``1000 * (base_seed + id) + j``, the seeds every detector uses): once by the plain
pipeline, once with a mitigator switched on (:func:`attnmem.mitigate.apply`; by default Ren et
al.'s beginning-token rescale with summary-token masking, ``Mitigation()``). The output folder
holds

- ``images/{id:06d}.png``: one row per generation, the plain image on the left, the mitigated
  one on the right;
- ``generate.jsonl``: one record per prompt (:mod:`attnmem.results`): id, prompt, seed, the
  run's model, settings and mitigator, the image's path (relative to the folder), and per
  generation how alike the two images are: ``pixel_r``, the Pearson correlation of their pixel
  values, and ``rms``, the root-mean-square pixel difference (images in [0, 1]). Both need no
  download (no SSCD or CLIP weights); a mitigation that works moves a memorized prompt's image
  (lower r) and leaves other prompts' images close (r near 1).

The job (prompt ids, batches, the output lock, ``--resume``, per-prompt failures, torchrun) is
:mod:`attnmem.jobs`, as for ``attnmem scan``; an image is written (atomically) before its record,
so a resumed run never lists an image that is not there.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnmem import results
from attnmem.errors import ScanError
from attnmem.jobs import Job, JobRun, JobSummary, run_job
from attnmem.pipelines import (
    DEFAULT_MODEL,
    LoadOptions,
    check_job_pipeline,
    load_pipeline,
    resolve_device,
    resolve_dtype,
)

__all__ = ["GenerateOptions", "RESULTS_NAME", "run_generate", "parse_mitigation", "similarity"]

RESULTS_NAME = "generate.jsonl"


@dataclass
class GenerateOptions:
    """Everything ``attnmem generate`` takes; ``out`` is a folder. ``mitigate``: a mitigator
    spec (:func:`parse_mitigation`)."""

    prompts: Path
    out: Path
    model: str = DEFAULT_MODEL
    mitigate: str = "bos_scale=1.25,mask=padding"
    n: int = 1
    batch_size: int = 4
    steps: int = 50
    guidance: float = 7.5
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


def parse_mitigation(spec: str) -> Any:
    """A mitigator from a spec string: ``key=value,...`` for :class:`attnmem.Mitigation` (e.g.
    ``bos_scale=1.25,mask=padding``; ``c1`` is accepted as the paper's name for ``bos_scale``), or
    any :func:`attnmem.mitigate.parse` spec ``NAME[:key=value,...]`` (``attention``,
    ``cfg-delay``, ``prompt-opt``). ValueError naming what is wrong."""
    from attnmem import mitigate

    spec = spec.strip()
    name, sep, rest = spec.partition(":")
    if not sep and ("=" in spec or not spec):
        name, rest = "attention", spec
    if name == "attention":
        items = [p.strip() for p in rest.split(",") if p.strip()]
        items = ["bos_scale" + p[2:] if p.startswith("c1=") else p for p in items]
        rest = ",".join(items)
    return mitigate.parse(f"{name}:{rest}" if rest else name)


def similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """How alike two (H, W, C) images in [0, 1] are: Pearson correlation of their pixel values
    (None when one image is constant) and their RMS difference."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    r = float((x * y).sum() / den) if den > 0 else None
    rms = float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))
    return {"pixel_r": r, "rms": rms}


def _grid(pairs: list[tuple[np.ndarray, np.ndarray]], gap: int = 4) -> Any:
    """One row per generation: plain | mitigated, on a white background."""
    from PIL import Image

    h, w = pairs[0][0].shape[:2]
    canvas = np.ones((len(pairs) * (h + gap) - gap, 2 * w + gap, 3), dtype=np.float32)
    for k, (plain, mitigated) in enumerate(pairs):
        top = k * (h + gap)
        canvas[top : top + h, :w] = plain[..., :3]
        canvas[top : top + h, w + gap :] = mitigated[..., :3]
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))


def _save_png(image: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_generate(opts: GenerateOptions, pipe: Any | None = None) -> JobSummary:
    """Generate plain and mitigated images of ``opts.prompts`` into the folder ``opts.out``
    (module docstring). ``pipe``: an already loaded pipeline to use instead of ``opts.model``."""
    if opts.n < 1:
        raise ScanError(f"--n must be >= 1, got {opts.n}")
    try:
        mitigator = parse_mitigation(opts.mitigate)
    except ValueError as e:
        raise ScanError(f"--mitigate {opts.mitigate}: {e}") from None
    folder = Path(opts.out)
    if folder.exists() and not folder.is_dir():
        raise ScanError(f"--out {folder} is a file; generate writes a folder (images + JSONL)")
    images = folder / "images"
    job = Job(
        name="generate",
        prompts=opts.prompts,
        out=folder / RESULTS_NAME,
        batch_size=opts.batch_size,
        seed=opts.seed,
        resume=opts.resume,
        limit=opts.limit,
        encoding=opts.encoding,
        progress=opts.progress,
    )

    def prepare(local_rank: int) -> JobRun:
        nonlocal pipe
        from attnmem import mitigate
        from attnmem.detect.base import generators

        device = resolve_device(opts.device, local_rank)
        dtype = resolve_dtype(opts.dtype, device)
        if pipe is None:
            pipe = load_pipeline(opts.model, device, dtype, opts.load)
        check_job_pipeline(pipe, opts.model)
        images.mkdir(parents=True, exist_ok=True)
        settings = {
            "num_inference_steps": opts.steps,
            "guidance_scale": opts.guidance,
            "height": opts.height,
            "width": opts.width,
            "n": opts.n,
        }
        base: dict[str, Any] = {
            "command": "generate",
            "model": opts.model,
            "dtype": str(dtype).removeprefix("torch."),
            "settings": settings,
            "mitigation": {
                "spec": opts.mitigate,
                "name": type(mitigator).__name__,
                **json.loads(results.dumps(vars(mitigator))),
            },
        }
        if opts.load.describe() is not None:
            base["load"] = opts.load.describe()
        kw: dict[str, Any] = {
            "num_inference_steps": opts.steps,
            "guidance_scale": opts.guidance,
            "num_images_per_prompt": opts.n,
            "output_type": "np",
        }
        kw.update({k: v for k, v in (("height", opts.height), ("width", opts.width)) if v})

        def process(ids: list[int], prompts: list[str], seeds: list[int]) -> list[Any]:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"attnmem: prompts .* truncated")
                plain = pipe(prompts, generator=generators(seeds, opts.n), **kw).images
                with mitigate.apply(pipe, mitigator):
                    mitigated = pipe(prompts, generator=generators(seeds, opts.n), **kw).images
            plain, mitigated = np.asarray(plain), np.asarray(mitigated)
            out = []
            for k, i in enumerate(ids):
                rows = range(k * opts.n, (k + 1) * opts.n)
                pairs = [(plain[r], mitigated[r]) for r in rows]
                name = Path("images") / f"{i:06d}.png"
                _save_png(_grid(pairs), folder / name)
                sims = [similarity(a, b) for a, b in pairs]
                rs = [s["pixel_r"] for s in sims if s["pixel_r"] is not None]
                out.append(
                    {
                        "image": str(name),
                        "similarity": sims,
                        "pixel_r": float(np.mean(rs)) if rs else None,
                        "rms": float(np.mean([s["rms"] for s in sims])),
                    }
                )
            return out

        def record(i: int, prompt: str, seed: int, value: Any, seconds: float) -> dict:
            rec: dict[str, Any] = {"id": i, "prompt": prompt, "seed": seed, **base}
            failed = isinstance(value, str)
            for key in ("image", "pixel_r", "rms", "similarity"):
                rec[key] = None if failed else value[key]
            rec["seconds"] = round(seconds, 6)
            rec["error"] = value if failed else None
            return rec

        return JobRun(base=base, process=process, record=record, pipe=pipe, steps=2 * opts.steps)

    return run_job(job, prepare)
