"""Loading the diffusers pipeline a job runs on: a built-in name, a local folder, a single-file
checkpoint or a hub id, with diffusers' loading conventions (:class:`LoadOptions`: variant,
revision, local files only, LoRA adapters), on the chosen device and dtype.

- :data:`BUNDLED_MODELS`: trained models shipped inside attnmem (``testbed``, the default);
- :data:`BUILTIN_MODELS`: tiny random-weight pipelines from :mod:`attnmem.testing` (their
  scores demonstrate the tooling and mean nothing about memorization);
- anything else: a local diffusers folder or a hub id, loaded with ``use_safetensors=True``
  (no pickle) and ``trust_remote_code=False`` (no code from the model repository), without a
  safety checker.

- a ``.safetensors`` file: a single-file checkpoint (``from_single_file``; SDXL when its keys
  say so, else Stable Diffusion 1/2), its component configs from ``config`` (a diffusers
  folder or hub id) or, without one, diffusers' default for its type. ``.ckpt`` / ``.bin``
  files are pickles and are refused.

Problems raise :class:`attnmem.errors.PipelineError` naming the ``--model`` / ``--device`` /
``--dtype`` value and what to do: a mistyped built-in name lists the names (it never goes to
the hub), an unreachable hub says so, a model missing from the cache under
``--local-files-only`` says so. ControlNet and IP-Adapter pipelines are refused by the jobs
(:func:`check_job_pipeline`): they need an image per prompt.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnmem.errors import PipelineError

__all__ = [
    "BUILTIN_MODELS",
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "LoadOptions",
    "check_job_pipeline",
    "load_pipeline",
    "model_calibration",
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


@dataclass(frozen=True)
class LoadOptions:
    """diffusers' loading conventions, for folders, hub ids and single files.

    variant: weight file variant (``"fp16"`` loads ``*.fp16.safetensors``); revision: a hub
    branch, tag or commit; local_files_only: never contact the hub (folders and the hub cache
    only); lora: LoRA adapter files or folders, loaded with ``pipe.load_lora_weights`` (needs
    peft) and fused at their default scale; config: for a single-file checkpoint, the diffusers
    folder or hub id whose component configs it uses.
    """

    variant: str | None = None
    revision: str | None = None
    local_files_only: bool = False
    lora: tuple[str, ...] = ()
    config: str | None = None

    def describe(self) -> dict[str, Any] | None:
        """The options that change the weights, for the records (None when all are default)."""
        out = {
            k: v
            for k, v in (
                ("variant", self.variant),
                ("revision", self.revision),
                ("lora", list(self.lora)),
                ("config", self.config),
            )
            if v
        }
        return out or None


def resolve_device(spec: str, local_rank: int = 0) -> Any:
    """``auto`` = CUDA when available, else Apple's MPS when available, else CPU; a bare ``cuda``
    under torchrun = cuda:LOCAL_RANK. Devices attnmem does not run on are refused by name."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise PipelineError(f"--device {spec!r}: {e}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise PipelineError(
            f"--device {spec}: attnmem runs on cpu, cuda (cuda:N) or mps, not {device.type}"
        )
    if device.type == "mps" and not has_mps:
        raise PipelineError(
            f"--device {spec}: MPS is not available to this torch (it needs an Apple-silicon "
            "Mac and a torch built with MPS); use --device cpu"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"--device {spec}: no CUDA device is available to this torch")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def resolve_dtype(spec: str, device: Any) -> Any:
    """``auto`` = fp16 on a GPU (CUDA, MPS), fp32 on CPU. fp16 on CPU is refused: slow, and some
    of the pipeline's layers have no CPU half kernels."""
    import torch

    if spec == "auto":
        spec = "fp16" if device.type in ("cuda", "mps") else "fp32"
    if spec not in _DTYPES:
        raise PipelineError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {spec!r}")
    if spec == "fp16" and device.type == "cpu":
        raise PipelineError("--dtype fp16 is not supported on CPU; use fp32 (or bf16)")
    return getattr(torch, _DTYPES[spec])


def load_pipeline(model: str, device: Any, dtype: Any, options: LoadOptions | None = None) -> Any:
    """A diffusers pipeline from a built-in name, a local folder, a single-file checkpoint or a
    hub id (module docstring), with ``options`` (:class:`LoadOptions`).

    Folders and hub ids load with ``use_safetensors=True`` (no pickle) and
    ``trust_remote_code=False`` (no code from the model repository). A safety checker is not
    loaded: it is not needed to score, and it would replace flagged images by black ones,
    which an image-similarity detector (carlini) would read as memorized.
    """
    import torch

    options = options or LoadOptions()
    if model in BUILTIN_MODELS:
        from attnmem import testing

        try:
            pipe = getattr(testing, BUILTIN_MODELS[model])()
        except (OSError, ValueError) as e:
            raise PipelineError(f"--model {model}: could not build it: {e}") from None
        if dtype != torch.float32:  # built in fp32; casting to fp32 again only warns
            pipe = pipe.to(dtype=dtype)
    elif model in BUNDLED_MODELS:
        folder = BUNDLED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise PipelineError(f"--model {model}: the bundled model is missing from {folder}")
        pipe = _from_pretrained(str(folder), dtype, options)
    elif Path(model).expanduser().is_file():
        pipe = _from_single_file(Path(model).expanduser(), dtype, options)
    else:
        pipe = _from_pretrained(model, dtype, options)
    for adapter in options.lora:
        pipe = _load_lora(pipe, adapter, model)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_job_pipeline(pipe: Any, model: str) -> None:
    """Refuse, before the first prompt, pipelines a job cannot drive: ControlNet (it needs a
    conditioning image per prompt), IP-Adapter (an image prompt), and a tokenizer that does not
    fit its text encoder (files missing from its folder: transformers then builds an empty one
    without a word)."""
    if getattr(pipe, "controlnet", None) is not None:
        raise PipelineError(
            f"--model {model}: a ControlNet pipeline ({type(pipe).__name__}) needs a "
            "conditioning image for every prompt, which attnmem's commands do not take. Scan "
            "the base model (the same UNet), or patch the ControlNet pipeline from Python: "
            "attnmem.patch(pipe) records and mitigates its UNet"
        )
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, enc = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tok is None or enc is None:
            continue
        want = getattr(getattr(enc, "config", None), "vocab_size", None)
        if (want is not None and len(tok) != want) or int(tok.model_max_length) > 1024:
            raise PipelineError(
                f"--model {model}: its {tok_name} does not fit its {enc_name} ({len(tok)} "
                f"tokens, the encoder has {want}; context length {tok.model_max_length}): "
                f"files are missing from the {tok_name}/ folder (vocab.json and merges.txt, or "
                "tokenizer.json)"
            )
    unet = getattr(pipe, "unet", None)
    if getattr(getattr(unet, "config", None), "encoder_hid_dim_type", None) == "ip_image_proj":
        raise PipelineError(
            f"--model {model}: an IP-Adapter is loaded, which attnmem does not support; save "
            "the pipeline without it (pipe.unload_ip_adapter())"
        )


def model_calibration(model: str) -> Path | None:
    """The metric-E calibration file a model folder ships (``attnmem_calibration.json``, see
    :mod:`attnmem.detect.calibration`), for a bundled name or a local folder; else None."""
    from attnmem.detect.calibration import CALIBRATION_FILE

    folder = BUNDLED_MODELS.get(model, Path(model).expanduser())
    path = folder / CALIBRATION_FILE
    return path if path.is_file() else None


def _load_lora(pipe: Any, adapter: str, model: str) -> Any:
    import importlib.util

    if not hasattr(pipe, "load_lora_weights"):
        raise PipelineError(f"--lora: {type(pipe).__name__} takes no LoRA adapters")
    if importlib.util.find_spec("peft") is None:
        raise PipelineError("--lora needs the peft package: pip install peft")
    path = Path(adapter).expanduser()
    if not path.exists():
        raise PipelineError(f"--lora {adapter}: no such file or folder")
    try:
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        else:
            pipe.load_lora_weights(str(path))
    except Exception as e:
        raise PipelineError(
            f"--lora {adapter}: not a LoRA adapter of --model {model} ({type(e).__name__}: {e})"
        ) from e
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


def _unknown_name(model: str) -> PipelineError:
    names = [*BUNDLED_MODELS, *BUILTIN_MODELS]
    close = difflib.get_close_matches(model, names, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return PipelineError(
        f"--model {model}: not a built-in name, a local folder or file, or a hub id "
        f"(owner/name).{hint} Built-in names: {', '.join(names)}"
    )


def _hub_failure(model: str, e: BaseException, options: LoadOptions) -> PipelineError | None:
    """A clear error when loading failed because the hub was out of reach or the model is not
    in the cache under local_files_only (None: another problem)."""
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    names = " ".join(type(c).__name__ for c in chain)
    text = " ".join(str(c) for c in chain)
    if options.local_files_only or "OfflineModeIsEnabled" in names or "HF_HUB_OFFLINE" in text:
        if "LocalEntryNotFound" in names or "offline" in text.lower() or "cache" in text.lower():
            return PipelineError(
                f"--model {model}: not in the local hub cache, and the hub may not be contacted "
                "(--local-files-only or HF_HUB_OFFLINE=1); download it once with network, or "
                "pass a local folder"
            )
    if any(
        k in names for k in ("ConnectError", "ConnectionError", "Timeout", "LocalEntryNotFound")
    ) or ("couldn't connect" in text.lower() or "cannot reach" in text.lower()):
        return PipelineError(
            f"--model {model}: the Hugging Face hub cannot be reached (no network, or a proxy "
            "or firewall in the way). Download the model on a connected machine and pass its "
            "folder, or use --local-files-only to load it from the hub cache"
        )
    return None


def _from_pretrained(model: str, dtype: Any, options: LoadOptions) -> Any:
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
    elif "/" not in model:
        raise _unknown_name(model)
    hub = {
        k: v
        for k, v in (("revision", options.revision), ("local_files_only", options.local_files_only))
        if v
    }
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": False,
        _dtype_keyword(): dtype,
        **hub,
    }
    if options.variant:
        kwargs["variant"] = options.variant
    try:
        config = DiffusionPipeline.load_config(model, **hub)
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
        hub_error = None if local.exists() else _hub_failure(model, e, options)
        if hub_error is not None:
            raise hub_error from e
        hint = ""
        if options.variant and "variant" in str(e):
            hint = f" (is there a {options.variant} variant of every component?)"
        raise PipelineError(
            f"--model {model}: could not load a diffusers pipeline ({type(e).__name__}: {e}){hint}. "
            "It must be a local diffusers folder or a reachable hub id with .safetensors weights."
        ) from e


def _from_single_file(path: Path, dtype: Any, options: LoadOptions) -> Any:
    """A single-file .safetensors checkpoint (module docstring)."""
    if path.suffix.lower() != ".safetensors":
        raise PipelineError(
            f"--model {path}: single-file checkpoints must be .safetensors; a {path.suffix} "
            "file is a pickle, which can run code when loaded (convert it, or use a diffusers "
            "folder)"
        )
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise PipelineError(f"--model {path}: not a readable safetensors file ({e})") from None
    sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kwargs: dict[str, Any] = {_dtype_keyword(): dtype}
    if options.config:
        kwargs["config"] = options.config
    if options.local_files_only:
        kwargs["local_files_only"] = True
    if not sdxl:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:
        hub_error = _hub_failure(str(path), e, options)
        if hub_error is not None and not options.config:
            raise PipelineError(
                f"--model {path}: a single-file checkpoint needs its model's configs, which "
                "come from the hub unless --config names a diffusers folder (or cached hub id) "
                f"of the same architecture. {hub_error}"
            ) from e
        raise PipelineError(
            f"--model {path}: could not load it as a {cls.__name__} single-file checkpoint "
            f"({type(e).__name__}: {e})"
        ) from e
