"""How the mitigators that act on whole UNet calls (:class:`GuidanceDelay`,
:class:`PromptOptimization`) attach to a diffusers pipeline: UNet forward hooks, and a wrap of
the pipeline's ``encode_prompt`` (an instance attribute; the class is untouched) that opens a
new per-call state with the number of images per prompt. :class:`CallHook` is the handle;
``remove()`` (or leaving its ``with`` block) restores the pipeline exactly.

The CFG batch is diffusers' ``[uncond x N, cond x N]``, N = prompts x images per prompt, one
prompt's images contiguous; both mitigators need guidance on (``guidance_scale > 1``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = ["CallHook", "unet_sample", "with_sample"]


def unet_sample(output: Any) -> torch.Tensor:
    """The prediction tensor of a UNet output (tuple or ``UNet2DConditionOutput``)."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """The same kind of UNet output holding ``sample`` instead."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


class CallHook:
    """Handle of a mitigator installed on a pipeline: the per-call state and its reports.

    Attributes:
        calls: one report (a dict) per pipeline call, filled by the mitigator.
    """

    def __init__(self, pipe: Any, owner: Any):
        self.pipe = pipe
        self.owner = owner
        self.calls: list[dict[str, Any]] = []
        self.state: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self.active = True
        unet = pipe.unet
        if getattr(pipe, "encode_prompt", None) is None:
            raise ValueError(
                f"{type(owner).__name__}: needs a diffusers pipeline with encode_prompt"
            )
        original = pipe.encode_prompt
        sig = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            n = int(bound.get("num_images_per_prompt") or 1)
            self.state = {"images_per_prompt": n, "step": 0}
            self.calls.append({})
            return original(*args, **kwargs)

        pipe.encode_prompt = encode_prompt
        if hasattr(owner, "pre_forward"):
            self._hooks.append(
                unet.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
            )
        self._hooks.append(unet.register_forward_hook(self._post, with_kwargs=True))

    def _require(self, batch: int) -> dict[str, Any]:
        if self.state is None:
            raise RuntimeError(
                f"{type(self.owner).__name__}: works on pipeline calls (the UNet was called "
                "directly, outside a pipeline call)"
            )
        if batch % 2 or not getattr(self.pipe, "do_classifier_free_guidance", True):
            raise ValueError(
                f"{type(self.owner).__name__}: needs classifier-free guidance (guidance_scale > 1); "
                f"the UNet batch has {batch} rows"
            )
        return self.state

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        return self.owner.pre_forward(self, module, args, kwargs, self._require(sample.shape[0]))

    def _post(self, module, args, kwargs, output):
        state = self._require(unet_sample(output).shape[0])
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        out = self.owner.post_forward(self, int(torch.as_tensor(t).flatten()[0]), output, state)
        state["step"] += 1
        return out

    def remove(self) -> None:
        """Restore the pipeline; calling it twice is harmless."""
        if not self.active:
            return
        self.active = False
        for h in self._hooks:
            h.remove()
        if "encode_prompt" in vars(self.pipe):
            del self.pipe.encode_prompt

    def __enter__(self) -> CallHook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
