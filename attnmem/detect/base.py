"""What every detector shares: the :class:`Detector` base, the one result schema
(:class:`DetectionResult`), per-generation seeds, and the per-token view of an attention record.

A detector scores prompts, higher = more likely memorized: ``score_batch(prompts, seeds)``
returns one :class:`DetectionResult` per prompt.

**Starting noise** (:func:`initial_latents`, docs/method.md §4 "Seeds"), the same for every
method, so detectors that generate see the same images:

- ``seeds``: generation j of a prompt whose seed is s starts from the noise of a CPU
  ``torch.Generator`` seeded :func:`generation_seed` ``(s, j)`` = ``1000 s + j``;
- ``generator=``: as diffusers pipelines take it: one generator (all latents drawn from it in
  one call, prompt-major), a list with one per generation (``len = prompts x n``), or a list with
  one per prompt (its n latents drawn from it in one call, as the official codes draw them);
- ``latents=``: explicit starting noise ``(prompts x n, C, h, w)``, prompt-major, to reproduce
  another code base's per-prompt scores exactly.

A new detector subclasses :class:`Detector` (a dataclass: its fields are its options), sets
``name`` and ``summary`` and is listed in :data:`attnmem.detect.METRICS`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch

if TYPE_CHECKING:
    from attnmem.patching import PatchHandle
    from attnmem.record import AttentionRecord

__all__ = [
    "Detector",
    "DetectionResult",
    "RESULT_FIELDS",
    "detection_result",
    "attention_results",
    "finished_record",
    "generation_seed",
    "generators",
    "initial_latents",
    "token_view",
    "top_triggers",
]


class DetectionResult(TypedDict):
    """One prompt's result; these are also the result fields of a results-file record.

    score: higher = more likely memorized. forwards: UNet sample-passes per prompt (one image
    row through the UNet once; a CFG call on n generations is 2n); jvps: forward-mode JVP
    sample-passes through the UNet (each carries its own primal; ``sharpness``); backwards:
    reverse-mode sample-passes (none of the detectors). components: named parts of a combined
    score (``anisotropy``: the norm and cosine terms), or None. The rest is
    filled by attention-based detectors (None / [] otherwise): L, the prompt's tokenized length
    (first EOS + 1); truncated, whether it exceeded 75 word-pieces; tokens and attention, the
    77 token strings and the attention per position (:func:`token_view`); triggers, the prompt
    tokens drawing the most attention ``[[pos, token, value], ...]``; entropy_steps (metric D),
    ``{"steps": [...], "entropy": [...]}`` over the denoising steps.
    """

    score: float
    L: int | None
    truncated: bool | None
    tokens: list[str] | None
    attention: list[float] | None
    triggers: list[list[Any]]
    entropy_steps: dict[str, list] | None
    forwards: int
    jvps: int
    backwards: int
    components: dict[str, float] | None


RESULT_FIELDS: tuple[str, ...] = tuple(DetectionResult.__annotations__)


def detection_result(score: float, forwards: int, **fields: Any) -> DetectionResult:
    """A :class:`DetectionResult` with the fields not given set to None (``triggers``: [])."""
    unknown = set(fields) - set(RESULT_FIELDS)
    if unknown:
        raise TypeError(f"not result fields: {sorted(unknown)}; the fields are {RESULT_FIELDS}")
    res = {key: None for key in RESULT_FIELDS} | {"triggers": [], "jvps": 0, "backwards": 0}
    res |= fields
    res.update(score=float(score), forwards=int(forwards))
    return DetectionResult(**res)


def generation_seed(seed: int, j: int) -> int:
    """Seed of generation ``j`` of a prompt whose seed is ``seed`` (shared by every method)."""
    return int(seed) * 1000 + int(j)


def generators(seeds: Sequence[int], n: int = 1) -> list[torch.Generator]:
    """CPU generators for n generations per prompt, prompt-major (diffusers' image order)."""
    return [torch.Generator().manual_seed(generation_seed(s, j)) for s in seeds for j in range(n)]


GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def latent_shape(pipe: Any, height: int | None = None, width: int | None = None) -> tuple:
    """(C, h, w) of one starting latent, as the pipeline's ``prepare_latents`` makes it."""
    unet = pipe.unet
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    size = getattr(pipe, "default_sample_size", None) or unet.config.sample_size
    h = int(height or size * scale) // scale
    w = int(width or size * scale) // scale
    return (int(unet.config.in_channels), h, w)


def pipeline_device_dtype(pipe: Any) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the pipeline draws its latents (its prompt embeddings' dtype)."""
    device = getattr(pipe, "_execution_device", None) or pipe.unet.device
    enc = getattr(pipe, "text_encoder", None)
    return torch.device(device), (enc.dtype if enc is not None else pipe.unet.dtype)


def initial_latents(
    pipe: Any,
    n_prompts: int,
    n: int = 1,
    *,
    seeds: Sequence[int] | None = None,
    generator: GeneratorArg = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, GeneratorArg]:
    """The starting noise of ``n_prompts x n`` generations, prompt-major, and the generator(s)
    to hand on to the pipeline (for its scheduler's noise, if it draws any).

    Exactly what ``pipe(..., generator=...)`` would draw (diffusers' ``randn_tensor``, CPU
    generators draw on the CPU in the pipeline's dtype), before the scheduler's
    ``init_noise_sigma``. Precedence: ``latents``, then ``generator``, then ``seeds``
    (generation j of seed s: ``generation_seed(s, j)``); see the module docstring.
    """
    from diffusers.utils.torch_utils import randn_tensor

    rows = n_prompts * n
    shape = (rows, *latent_shape(pipe, height, width))
    device, dtype = pipeline_device_dtype(pipe)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise ValueError(
                f"latents must have shape {shape} ({n_prompts} prompts x {n} generations, "
                f"prompt-major), got {got}"
            )
        return latents.to(device=device, dtype=dtype), generator
    if generator is None:
        if seeds is None:
            raise ValueError("give seeds, generator or latents for the starting noise")
        gens = generators(seeds, n)
        return randn_tensor(shape, generator=gens, device=device, dtype=dtype), gens
    if isinstance(generator, torch.Generator):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype), generator
    generator = list(generator)
    if len(generator) == rows:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype), generator
    if len(generator) == n_prompts:
        one = (n, *shape[1:])
        x = torch.cat(
            [randn_tensor(one, generator=g, device=device, dtype=dtype) for g in generator]
        )
        return x, None
    raise ValueError(
        f"got {len(generator)} generators for {n_prompts} prompts x {n} generations: pass one "
        f"generator, one per prompt ({n_prompts}) or one per generation ({rows})"
    )


# ----------------------------------------------------------------------------------------------
# Per-token view
# ----------------------------------------------------------------------------------------------
def _kind(pos: int, L: int | None) -> str:
    if pos == 0:
        return "bos"
    if L is None:
        return "token"
    if pos < L - 1:
        return "prompt"
    if pos == L - 1:
        return "eos"
    return "summary"


def token_view(
    record: AttentionRecord, image: int = 0, steps=None, layers=None
) -> list[dict[str, Any]]:
    """Pixel/head/layer-averaged attention per position of one image, with its token string.

    Returns 77 dicts ``{"pos", "token", "kind", "attention"}``; kind is ``bos``, ``prompt``,
    ``eos`` or ``summary`` (padding positions >= L, which summarise the whole prompt).
    """
    a = record.mean_attention(steps, layers)[image].float().cpu().tolist()
    p = record.prompt_of_image(image)
    L = int(record.lengths[p]) if record.lengths is not None else None
    tokens = record.tokens[p] if record.tokens is not None else [str(i) for i in range(len(a))]
    return [
        {"pos": j, "token": tokens[j], "kind": _kind(j, L), "attention": v} for j, v in enumerate(a)
    ]


def top_triggers(view: list[dict[str, Any]], k: int = 5) -> list[list[Any]]:
    """The k prompt tokens drawing the most attention: ``[[pos, token, value], ...]``."""
    prompt = [t for t in view if t["kind"] in ("prompt", "token") and t["pos"] > 0]
    prompt.sort(key=lambda t: -t["attention"])
    return [[t["pos"], t["token"], round(float(t["attention"]), 6)] for t in prompt[:k]]


# ----------------------------------------------------------------------------------------------
# The base
# ----------------------------------------------------------------------------------------------
@dataclass
class Detector:
    """A scorer of prompts on a diffusers pipeline; its dataclass fields are its options.

    Subclasses set ``name`` (the registry key, recorded with every result) and ``summary``
    (one line for ``attnmem scan --help``) and implement :meth:`score_batch`. Every subclass's
    ``score_batch`` is wrapped (:meth:`__init_subclass__`) so that, whatever the detector, a
    single string is one prompt (and a single int one seed), and every result says the
    prompt's L and whether it was truncated (:meth:`prompt_lengths`) when the detector itself
    did not.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "score_batch" in cls.__dict__:
            cls.score_batch = _completed(cls.__dict__["score_batch"])

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    pipe: Any
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None

    def settings(self) -> dict[str, Any]:
        """What the scores depend on, recorded with every result (a resumed scan must match)."""
        return {
            "metric": self.name,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
        }

    @property
    def generations(self) -> int:
        """Generations (starting latents) per prompt."""
        return int(getattr(self, "n", 1))

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        """One result per prompt. Starting noise (module docstring): prompt i's generations use
        seed ``seeds[i]``, or ``generator`` (one, one per prompt or one per generation), or
        ``latents`` of shape ``(prompts x generations, C, h, w)``, prompt-major."""
        raise NotImplementedError

    def unet_calls(self) -> int:
        """UNet forwards of one ``score_batch`` call (for progress display): by default one
        per denoising step."""
        return self.num_inference_steps

    def starting_noise(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None,
        generator: GeneratorArg,
        latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, GeneratorArg]:
        """Check the batch and draw its starting noise (:func:`initial_latents`)."""
        if not prompts:
            raise ValueError("no prompts to score")
        if seeds is not None:
            self._check(prompts, seeds)
        return initial_latents(
            self.pipe,
            len(prompts),
            self.generations,
            seeds=seeds,
            generator=generator,
            latents=latents,
            height=self.height,
            width=self.width,
        )

    def _pipe_kwargs(self, guidance_scale: float | None = None) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            "output_type": "latent",
        }
        if self.height is not None:
            kw["height"] = self.height
        if self.width is not None:
            kw["width"] = self.width
        return kw

    @staticmethod
    def _check(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("no prompts to score")

    def prompt_lengths(self, prompts: Sequence[str]) -> tuple[list[int | None], list[bool | None]]:
        """L and the truncation flag of each prompt as the pipeline's tokenizer encodes it
        (docs/method.md §1), for every detector's results; Nones when the pipeline has no
        CLIP-style tokenizer."""
        from attnmem.tokenizer import encode_prompts

        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
            return [None] * len(prompts), [None] * len(prompts)
        enc = encode_prompts(tokenizer, list(prompts))
        return [int(L) for L in enc.lengths], list(enc.truncated)


def _completed(score_batch: Any) -> Any:
    """``score_batch`` with a single prompt string (and seed int) taken as one, and L and
    truncation filled into results that lack them."""

    @functools.wraps(score_batch)
    def wrapper(self: Detector, prompts: Any, seeds: Any = None, **kwargs: Any) -> Any:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(seeds, int):
            seeds = [seeds]
        results = score_batch(self, prompts, seeds, **kwargs)
        if any(r.get("truncated") is None for r in results):
            for r, L, cut in zip(results, *self.prompt_lengths(prompts)):
                if r.get("L") is None:
                    r["L"] = L
                if r.get("truncated") is None:
                    r["truncated"] = cut
        return results

    return wrapper


# ----------------------------------------------------------------------------------------------
# Helpers of attention-based detectors
# ----------------------------------------------------------------------------------------------
def finished_record(handle: PatchHandle) -> AttentionRecord:
    """The latest record of a patch, on the CPU; an error if nothing was recorded."""
    rec = handle.record
    if not rec.steps:
        raise RuntimeError(
            "attnmem: the pipeline ran but no cross-attention statistics were recorded"
        )
    return rec.to("cpu")


def attention_results(
    rec: AttentionRecord,
    scores: torch.Tensor,
    views: list[list[dict]],
    forwards: int,
    entropy_steps: list[dict] | None = None,
) -> list[DetectionResult]:
    """Results of an attention-based detector: per image, its score and token view."""
    return [
        detection_result(
            scores[i],
            forwards,
            L=int(rec.lengths[i]) if rec.lengths is not None else None,
            truncated=bool(rec.truncated[i]) if rec.truncated is not None else None,
            tokens=[t["token"] for t in view],
            attention=[round(float(t["attention"]), 7) for t in view],
            triggers=top_triggers(view),
            entropy_steps=entropy_steps[i] if entropy_steps is not None else None,
        )
        for i, view in enumerate(views)
    ]
