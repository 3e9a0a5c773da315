"""Loading the diffusers pipeline a scan runs on: a built-in name, a local folder or a hub id,
on the chosen device and dtype.

- :data:`BUNDLED_MODELS`: trained models shipped inside attnmem (``testbed``, the default);
- :data:`BUILTIN_MODELS`: tiny random-weight pipelines from :mod:`attnmem.testing` (their
  scores demonstrate the tooling and mean nothing about memorization);
- anything else: a local diffusers folder or a hub id, loaded with ``use_safetensors=True``
  (no pickle) and ``trust_remote_code=False`` (no code from the model repository), without a
  safety checker.

Problems raise :class:`attnmem.errors.PipelineError` naming the ``--model`` / ``--device`` /
``--dtype`` value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnmem.errors import PipelineError

__all__ = [
    "BUILTIN_MODELS",
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "load_pipeline",
    "resolve_device",
    "resolve_dtype",
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


def resolve_device(spec: str, local_rank: int = 0) -> Any:
    """``auto`` = CUDA when available, else CPU; a bare ``cuda`` under torchrun = cuda:LOCAL_RANK."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise PipelineError(f"--device {spec!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"--device {spec}: no CUDA device is available to this torch")
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
        raise PipelineError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {spec!r}")
    if spec == "fp16" and device.type == "cpu":
        raise PipelineError("--dtype fp16 is not supported on CPU; use fp32 (or bf16)")
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
            raise PipelineError(f"--model {model}: the bundled model is missing from {folder}")
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
            raise PipelineError(
                f"--model {model}: this folder is not a diffusers pipeline (no model_index.json)"
            )
        model = str(local)
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise PipelineError(
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
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(
            f"--model {model}: could not load a diffusers pipeline ({type(e).__name__}: {e}). "
            "It must be a local diffusers folder or a reachable hub id with .safetensors weights."
        ) from e
