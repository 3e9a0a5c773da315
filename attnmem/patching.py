"""Installing attnmem on a diffusers pipeline or UNet, and restoring it exactly.

``handle = attnmem.patch(pipe_or_unet, record=True, mitigate=None)`` installs an
:class:`attnmem.processor.AttnMemProcessor` on every cross-attention module (``attn2``) and
leaves self-attention alone; ``handle.remove()`` (or leaving ``with handle:``) puts back exactly
the processors that were there. Patching twice replaces the first patch.

The handle learns the prompts by wrapping the pipeline's ``encode_prompt`` (an instance
attribute; the class is untouched), so a plain ``pipe(prompts, ...)`` call just works. A UNet
called directly takes explicit lengths through :meth:`PatchHandle.set_prompts`. UNet forward
hooks open and close each call on the controller and check that no one replaced the
processors since (attention slicing and xformers do: :class:`PatchRemovedError`).
:func:`run_unet_until` stops a forward early, right after the layer a detector needs.

(The module is ``patching`` rather than ``patch`` so that the public function
``attnmem.patch`` is never shadowed by a submodule of the same name.)
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnmem.errors import PatchRemovedError
from attnmem.mitigate import Mitigation
from attnmem.processor import AttnMemProcessor, Controller, EarlyExit, PromptBatch
from attnmem.record import AttentionRecord, RecordSpec

__all__ = ["patch", "PatchHandle", "PatchRemovedError", "run_unet_until", "layer_names"]


def _cross_attention_modules(unet: torch.nn.Module) -> dict[str, Any]:
    from diffusers.models.attention_processor import Attention

    return {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, Attention)
        and getattr(m, "is_cross_attention", False)
        and name.endswith("attn2")
    }


_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def layer_names(pipe_or_unet: Any) -> list[str]:
    """Names of the cross-attention (attn2) modules in execution order (down, mid, up blocks,
    each in index order), which is what a layer index means everywhere in attnmem (the
    registration order puts mid_block last)."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    names = list(_cross_attention_modules(unet))
    order = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (_SECTION_ORDER.get(n.split(".")[0], 3), order[n]))


def check_layer(pipe_or_unet: Any, layer: str | int, option: str = "layer") -> None:
    """ValueError naming the valid range (or some valid names) when ``layer`` is not a
    cross-attention layer of this model: an index in execution order or a module name (or a
    prefix of one, e.g. ``down_blocks.1.attentions.1``)."""
    names = layer_names(pipe_or_unet)
    if isinstance(layer, int):
        if not -len(names) <= layer < len(names):
            raise ValueError(
                f"{option} {layer} is out of range: this model has {len(names)} cross-attention "
                f"layers, so give an index in {-len(names)}..{len(names) - 1} or a module name "
                f"such as {names[0].removesuffix('.transformer_blocks.0.attn2')}"
            )
    elif not any(n == layer or n.startswith(layer + ".") for n in names):
        raise ValueError(
            f"{option} {layer!r} names no cross-attention layer of this model; its "
            f"{len(names)} layers are {names[0]} ... {names[-1]} (or give an index in "
            f"{-len(names)}..{len(names) - 1})"
        )


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised by the caller of this function that names the first
    frame outside attnmem, diffusers, transformers and torch: the user's pipeline call, not a
    library file in between (torch.no_grad's wrapper, the pipeline's ``__call__``)."""
    import diffusers
    import transformers

    import attnmem

    skip = tuple(os.path.dirname(m.__file__) for m in (attnmem, diffusers, transformers, torch))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _prompt_info(
    pipe: Any, bound: inspect.BoundArguments, prompt_embeds: torch.Tensor
) -> PromptBatch:
    args = bound.arguments
    n_img = int(args.get("num_images_per_prompt") or 1)
    cfg = bool(args.get("do_classifier_free_guidance", False))
    n_rows = int(prompt_embeds.shape[0])
    prompt = args.get("prompt")
    lengths = tokens = truncated = prompts = None
    tokenizer = getattr(pipe, "tokenizer", None)
    if (
        prompt is not None
        and tokenizer is not None
        and getattr(tokenizer, "eos_token_id", None) is not None
    ):
        from attnmem.tokenizer import encode_prompts

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        enc = encode_prompts(tokenizer, prompts)
        lengths, tokens, truncated = enc.lengths.cpu(), enc.tokens, enc.truncated
        if any(truncated):
            cut = [i for i, t in enumerate(truncated) if t]
            warnings.warn(
                f"attnmem: prompts {cut} exceed 75 word-pieces and were truncated to L = 77",
                stacklevel=_caller_stacklevel(),
            )
    if prompts is not None and n_rows != len(prompts) * n_img:
        n_img = max(1, n_rows // len(prompts))
    return PromptBatch(
        n_rows=n_rows,
        images_per_prompt=n_img,
        lengths=lengths,
        cfg=cfg,
        prompts=prompts,
        tokens=tokens,
        truncated=truncated,
    )


class PatchHandle:
    """Restores the original processors on :meth:`remove` (or when a ``with`` block ends).

    Attributes:
        controller: the shared per-call state (mitigation, record spec, current step).
        records: one :class:`AttentionRecord` per pipeline call (or :meth:`set_prompts` call).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        pipe: Any | None,
        controller: Controller,
        originals: dict[str, Any],
    ):
        self.unet = unet
        self.pipe = pipe
        self.controller = controller
        self.originals = originals
        self._hooks: list[Any] = []
        self._encode_wrapped = False
        self.active = True

    # -- records --------------------------------------------------------------------------------
    @property
    def records(self) -> list[AttentionRecord]:
        return self.controller.records

    @property
    def record(self) -> AttentionRecord:
        """The record of the latest generation."""
        if not self.controller.records:
            raise ValueError("attnmem: nothing recorded yet; run the pipeline (or the UNet) first")
        return self.controller.records[-1]

    def set_prompts(
        self,
        lengths: Sequence[int] | torch.Tensor | None = None,
        *,
        n_rows: int | None = None,
        images_per_prompt: int = 1,
        cfg: bool | None = None,
        prompts: Sequence[str] | None = None,
    ) -> AttentionRecord:
        """Describe the batch of direct UNet calls and start a new record (step counter to 0).

        Args:
            lengths: L per prompt (first EOS + 1); needed for masking and partial entropies.
            n_rows: conditional rows per UNet call (default: prompts x images_per_prompt).
            images_per_prompt: images per prompt (rows of one prompt are contiguous).
            cfg: the batch is ``[uncond, cond]``; None infers it from the batch size.
            prompts: the prompt texts, if known (tokens are then recorded too).
        """
        tokens = truncated = None
        if prompts is not None:
            from attnmem.tokenizer import encode_prompts

            tok = getattr(self.pipe, "tokenizer", None)
            if tok is None:
                from attnmem.tokenizer import clip_tokenizer

                tok = clip_tokenizer()
            enc = encode_prompts(tok, list(prompts))
            tokens, truncated = enc.tokens, enc.truncated
            if lengths is None:
                lengths = enc.lengths
        lt = (
            None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64).cpu().flatten()
        )
        if lt is not None and ((lt < 1).any() or (lt > 77).any()):
            raise ValueError(f"attnmem: lengths must lie in [1, 77], got {lt.tolist()}")
        if n_rows is None:
            if lt is None:
                raise ValueError("attnmem: set_prompts needs lengths, prompts or n_rows")
            n_rows = len(lt) * images_per_prompt
        self.controller.begin_prompts(
            PromptBatch(
                n_rows=n_rows,
                images_per_prompt=images_per_prompt,
                lengths=lt,
                cfg=cfg,
                prompts=list(prompts) if prompts is not None else None,
                tokens=tokens,
                truncated=truncated,
            )
        )
        return self.controller.records[-1]

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_intact(self) -> None:
        for name, module in _cross_attention_modules(self.unet).items():
            proc = module.processor
            if not (isinstance(proc, AttnMemProcessor) and proc.controller is self.controller):
                raise PatchRemovedError(
                    f"attnmem: the processor of {name} was replaced after attnmem.patch() "
                    f"(now {type(proc).__name__}; enable_attention_slicing, xformers and set_attn_processor do this). "
                    "Enable those first, then call attnmem.patch() again."
                )

    def _pre_forward(self, module, args, kwargs):
        self._check_intact()
        sample = kwargs.get("sample", args[0] if args else None)
        self.controller.begin_unet_call(int(sample.shape[0]))

    def _post_forward(self, module, args, kwargs, output):
        ctl = self.controller
        step = ctl.step
        ctl.end_unet_call()
        if ctl.stop_after_step is not None and step >= ctl.stop_after_step:
            raise EarlyExit(f"step {step}")

    def _install(self) -> None:
        self._hooks.append(self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._hooks.append(self.unet.register_forward_hook(self._post_forward, with_kwargs=True))
        pipe = self.pipe
        if pipe is not None and hasattr(pipe, "encode_prompt"):
            original = pipe.encode_prompt  # bound method of the class
            sig = inspect.signature(original)
            ctl = self.controller

            @functools.wraps(original)
            def encode_prompt(*args, **kwargs):
                result = original(*args, **kwargs)
                bound = sig.bind_partial(*args, **kwargs)
                embeds = result[0] if isinstance(result, tuple) else result
                ctl.begin_prompts(_prompt_info(pipe, bound, embeds))
                return result

            pipe.encode_prompt = encode_prompt
            self._encode_wrapped = True

    def remove(self) -> None:
        """Restore the original processors and hooks exactly; calling it twice is harmless."""
        if not self.active:
            return
        self.active = False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._encode_wrapped and "encode_prompt" in vars(self.pipe):
            del self.pipe.encode_prompt
        modules = _cross_attention_modules(self.unet)
        for name, original in self.originals.items():
            modules[name].set_processor(original)
        if getattr(self.unet, "_attnmem_handle", None) is self:
            del self.unet._attnmem_handle

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({len(self.originals)} cross-attention layers, {state}, mitigation={self.controller.mitigation})"


def _as_record_spec(record: bool | RecordSpec | None) -> RecordSpec | None:
    if record is None or record is False:
        return None
    if record is True:
        return RecordSpec()
    if isinstance(record, RecordSpec):
        return record
    raise ValueError(f"attnmem.patch: record must be True/False or a RecordSpec, got {record!r}")


def patch(
    pipe_or_unet: Any,
    *,
    record: bool | RecordSpec | None = True,
    mitigate: Mitigation | None = None,
) -> PatchHandle:
    """Install attnmem's processor on every cross-attention layer of a pipeline or UNet.

    Args:
        pipe_or_unet: a diffusers pipeline with ``.unet`` (SD1.x, SD2.x, SDXL) or a
            ``UNet2DConditionModel``.
        record: record statistics (True: every step and layer; a :class:`RecordSpec` to limit
            them; False: none).
        mitigate: a :class:`Mitigation` to apply while generating, or None.

    Returns:
        A :class:`PatchHandle`; ``handle.remove()`` (or leaving ``with handle:``) restores the
        original processors. Patching an already patched UNet replaces the first patch (its
        handle is removed) and still restores the true originals.
    """
    if mitigate is not None and not isinstance(mitigate, Mitigation):
        raise ValueError(
            f"attnmem.patch: mitigate must be an attnmem.Mitigation or None, got {type(mitigate).__name__}"
        )
    unet = getattr(pipe_or_unet, "unet", None)
    pipe = pipe_or_unet if unet is not None else None
    if unet is None:
        unet = pipe_or_unet
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "attn_processors"):
        raise ValueError(
            f"attnmem.patch: expected a diffusers pipeline with .unet or a UNet model, got {type(pipe_or_unet).__name__}"
        )
    previous = getattr(unet, "_attnmem_handle", None)
    if previous is not None and previous.active:
        previous.remove()
    modules = _cross_attention_modules(unet)
    if not modules:
        raise ValueError("attnmem.patch: this model has no cross-attention (attn2) modules")
    for name, m in modules.items():
        if hasattr(m.processor, "to_k_ip"):  # diffusers' IPAdapter*AttnProcessor classes
            raise ValueError(
                f"attnmem.patch: {name} runs an IP-Adapter processor "
                f"({type(m.processor).__name__}); attnmem does not support IP-Adapter: call "
                "pipe.unload_ip_adapter() first"
            )
    controller = Controller(_as_record_spec(record), mitigate)
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(AttnMemProcessor(controller, name, m.processor))
    handle = PatchHandle(unet, pipe, controller, originals)
    handle._install()
    unet._attnmem_handle = handle
    return handle


def run_unet_until(
    handle: PatchHandle, layer: str | int | None, fn: Callable[[], Any], *, step: int | None = None
) -> bool:
    """Run ``fn`` (a UNet forward, or a whole pipeline call) and stop it right after ``layer``
    produced its statistics, or once UNet call ``step`` has ended (layer=None).

    Returns True when it stopped early (False if ``fn`` ran to the end)."""
    ctl = handle.controller
    ctl.stop_after, ctl.stop_after_step = layer, step
    try:
        fn()
        return False
    except EarlyExit:
        ctl.end_unet_call()  # keep what was recorded, close the call
        return True
    finally:
        ctl.stop_after = ctl.stop_after_step = None
