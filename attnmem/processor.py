"""Patching diffusers' cross-attention: processor, controller and the handle (SPEC §3).

``handle = attnmem.patch(pipe_or_unet, record=True, mitigate=None)`` installs an
:class:`AttnMemProcessor` on every cross-attention module (``attn2``) and leaves self-attention
alone. A :class:`Controller` shared by those processors knows, for the current UNet call:

- the prompts' lengths L and which UNet batch rows are conditional. With classifier-free
  guidance the batch is ``[uncond x n, cond x n]`` with ``n = prompts x num_images_per_prompt``
  and one prompt's images contiguous; without it every row is conditional;
- the step index (UNet calls since the pipeline call began) and what to record or mitigate.

It learns the prompts by wrapping the pipeline's ``encode_prompt`` (an instance attribute; the
class is untouched), so a plain ``pipe(prompts, ...)`` call just works. A UNet called directly
takes explicit lengths through :meth:`PatchHandle.set_prompts`. Per-call state lives here and
not in ``cross_attention_kwargs`` (which would also reach attn1 and warn on every call).

Statistics stay on the device until the UNet call ends (no host sync per layer).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnmem import ops
from attnmem.mitigate import Mitigation
from attnmem.record import AttentionRecord

__all__ = [
    "patch",
    "PatchHandle",
    "Controller",
    "AttnMemProcessor",
    "RecordSpec",
    "EarlyExit",
    "PatchRemovedError",
]


class PatchRemovedError(RuntimeError):
    """attnmem's processors were replaced after patching (attention slicing, xformers, ...)."""


class EarlyExit(Exception):
    """Raised by a processor to stop the UNet forward once the requested layer has run."""


@dataclass(frozen=True)
class RecordSpec:
    """What to record: steps (indices, or None = all) and layers (names/indices, None = all)."""

    steps: tuple[int, ...] | None = None
    layers: tuple[str | int, ...] | None = None

    def wants_step(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def wants_layer(self, name: str, index: int) -> bool:
        return (
            self.layers is None
            or name in self.layers
            or index in self.layers
            or any(isinstance(x, str) and name.startswith(x + ".") for x in self.layers)
        )


@dataclass
class _Prompts:
    n_rows: int  # conditional images = prompts x images per prompt
    images_per_prompt: int
    lengths: torch.Tensor | None  # (n_prompts,) int64 on the CPU
    cfg: bool | None  # None: infer from the UNet batch size
    prompts: list[str] | None = None
    tokens: list[list[str]] | None = None
    truncated: list[bool] | None = None


class Controller:
    """Per-call state shared by the processors of one patch."""

    def __init__(self, record: RecordSpec | None, mitigation: Mitigation | None):
        self.record_spec = record
        self.mitigation = mitigation
        self.prompts: _Prompts | None = None
        self.step = 0
        self.records: list[AttentionRecord] = []
        self.stop_after: str | int | None = None  # early exit after this layer (name or index)
        self.stop_after_step: int | None = None  # early exit once this UNet call has ended
        self.patched_names: list[str] = []
        self._call: dict[str, Any] | None = None
        self._row_cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    # -- call boundaries ------------------------------------------------------------------------
    def begin_prompts(self, prompts: _Prompts) -> None:
        """A new generation: reset the step counter and open a new record."""
        self.prompts = prompts
        self.step = 0
        self._row_cache.clear()
        rec = AttentionRecord(
            lengths=prompts.lengths,
            images_per_prompt=prompts.images_per_prompt,
            prompts=prompts.prompts,
            tokens=prompts.tokens,
            truncated=prompts.truncated,
        )
        self.records.append(rec)

    def begin_unet_call(self, batch: int) -> None:
        p = self.prompts
        if p is None:
            p = _Prompts(n_rows=batch, images_per_prompt=1, lengths=None, cfg=False)
            self.begin_prompts(p)
        if p.cfg is None:
            cfg = batch == 2 * p.n_rows
        else:
            cfg = p.cfg
        expected = 2 * p.n_rows if cfg else p.n_rows
        if batch != expected:
            raise ValueError(
                f"attnmem: the UNet batch has {batch} rows but the prompts give {p.n_rows} conditional rows"
                f"{' (x2 with guidance)' if cfg else ''}; call handle.set_prompts(...) to describe this batch"
            )
        cond = slice(p.n_rows, 2 * p.n_rows) if cfg else slice(0, p.n_rows)
        record = self.record_spec is not None and self.record_spec.wants_step(self.step)
        mitigate = self.mitigation is not None and self.mitigation.active_at(self.step)
        self._call = {
            "batch": batch,
            "cfg": cfg,
            "cond": cond,
            "record": record,
            "mitigate": mitigate,
            "index": 0,
            "order": [],
            "attn": {},
            "ent": {},
        }

    def end_unet_call(self) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        if call["record"]:
            self.records[-1].add_step(self.step, call["attn"], call["ent"], call["order"])
        self.step += 1

    def abort_unet_call(self) -> None:
        """After an early exit: keep what was recorded, close the call."""
        self.end_unet_call()

    # -- per layer ----------------------------------------------------------------------------
    def layer_params(
        self, name: str, Nk: int, device: torch.device
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None, bool]:
        """(layer index in execution order, key_len, bos_scale, want statistics) for this layer."""
        call = self._call
        if call is None:  # the attention module was called outside a UNet forward
            return -1, None, None, False
        index = call["index"]
        call["index"] = index + 1
        call["order"].append(name)
        want = call["record"] and self.record_spec.wants_layer(name, index)
        m = self.mitigation
        if not (call["mitigate"] and m.applies_to(name, index)):
            return index, None, None, want
        key_len, bos = self._row_tensors(Nk, device)
        return index, key_len, bos, want

    def _row_tensors(
        self, Nk: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-row key_len and bos_scale under the CFG layout; built once per layout and device."""
        call, p, m = self._call, self.prompts, self.mitigation
        key = (call["batch"], call["cfg"], Nk, str(device))
        if key in self._row_cache:
            return self._row_cache[key]
        n, cfg = p.n_rows, call["cfg"]
        bos = [1.0] * n + [float(m.c1)] * n if cfg else [float(m.c1)] * n
        key_len = None
        if m.masks:
            if p.lengths is None:
                raise ValueError(
                    "attnmem: masking summary tokens needs each prompt's length L; pass prompts as text, "
                    "or call handle.set_prompts(lengths=...), or use Mitigation(mask='none')"
                )
            per_image = [
                m.key_len(int(L), Nk)
                for L in p.lengths.repeat_interleave(p.images_per_prompt).tolist()
            ]
            if cfg:
                uncond = per_image if m.uncond == "official" else [Nk] * n
                key_len = uncond + per_image
            else:
                key_len = per_image
        bos_t = torch.tensor(bos, dtype=torch.float32).to(device, non_blocking=True)
        kl_t = (
            torch.tensor(key_len, dtype=torch.int64).to(device, non_blocking=True)
            if key_len is not None
            else None
        )
        self._row_cache[key] = (kl_t, bos_t)
        return kl_t, bos_t

    def store(
        self, name: str, index: int, prob_sum: torch.Tensor, ent_sum: torch.Tensor, Nq: int
    ) -> None:
        call = self._call
        cond = call["cond"]
        call["attn"][name] = prob_sum[cond] / Nq
        call["ent"][name] = ent_sum[cond] / Nq

    def should_stop(self, name: str, index: int) -> bool:
        s = self.stop_after
        if s is None:
            return False
        if isinstance(s, int):
            return s == index
        return s == name or name.startswith(s + ".")


class AttnMemProcessor:
    """diffusers attention processor (``AttnProcessor`` call signature) running attnmem's op.

    Installed only on cross-attention modules. Inputs the op cannot take (an attention mask,
    more than 128 keys, self-attention) go to the module's original processor; the reason of
    the last such fallback is in ``last_fallback``.
    """

    def __init__(self, controller: Controller, name: str, original: Any):
        self.controller = controller
        self.name = name
        self.original = original
        self.last_fallback: str | None = None

    def fast_path_reasons(self, query: torch.Tensor) -> list[str]:
        """Why the compiled kernel would not run this layer's input (empty: it would)."""
        return ops.fast_path_reasons(query)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        reason = None
        if encoder_hidden_states is None:
            reason = "called as self-attention (no encoder_hidden_states)"
        elif attention_mask is not None:
            reason = "an attention mask was given (attnmem masks by key length only)"
        elif encoder_hidden_states.shape[1] > ops.MAX_KEYS:
            reason = f"{encoder_hidden_states.shape[1]} keys > {ops.MAX_KEYS}"
        if reason is not None:
            self.last_fallback = reason
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        B, Nq, _ = hidden_states.shape

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        H = attn.heads
        D = key.shape[-1] // H
        Nk = key.shape[1]
        # (B, N, H*D) -> (B, N, H, D) views: the op reads diffusers' layout without copies.
        query = query.view(B, Nq, H, D)
        key = key.view(B, Nk, H, D)
        value = value.view(B, Nk, H, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ctl = self.controller
        index, key_len, bos, want = ctl.layer_params(self.name, Nk, query.device)
        out, prob_sum, ent_sum, _ = ops.cross_attention_unchecked(
            query, key, value, key_len, bos, attn.scale, want
        )
        if want:
            ctl.store(self.name, index, prob_sum, ent_sum, Nq)
        if ctl.should_stop(self.name, index):
            raise EarlyExit(self.name)

        hidden_states = out.view(B, Nq, H * D).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ----------------------------------------------------------------------------------------------
# Handle
# ----------------------------------------------------------------------------------------------
def _cross_attention_modules(unet: torch.nn.Module) -> dict[str, Any]:
    from diffusers.models.attention_processor import Attention

    return {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, Attention)
        and getattr(m, "is_cross_attention", False)
        and name.endswith("attn2")
    }


def _prompt_info(pipe: Any, bound: inspect.BoundArguments, prompt_embeds: torch.Tensor) -> _Prompts:
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
                stacklevel=4,
            )
    if prompts is not None and n_rows != len(prompts) * n_img:
        n_img = max(1, n_rows // len(prompts))
    return _Prompts(
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
            _Prompts(
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


def _as_record_spec(record: bool | RecordSpec | dict | None) -> RecordSpec | None:
    if record is None or record is False:
        return None
    if record is True:
        return RecordSpec()
    if isinstance(record, RecordSpec):
        return record
    if isinstance(record, dict):
        steps = record.get("steps")
        layers = record.get("layers")
        return RecordSpec(
            steps=tuple(steps)
            if isinstance(steps, Iterable)
            else (None if steps is None else (steps,)),
            layers=tuple(layers)
            if isinstance(layers, Iterable) and not isinstance(layers, str)
            else (None if layers is None else (layers,)),
        )
    raise ValueError(
        f"attnmem.patch: record must be True/False, a RecordSpec or a dict, got {record!r}"
    )


def patch(
    pipe_or_unet: Any,
    *,
    record: bool | RecordSpec | dict | None = True,
    mitigate: Mitigation | None = None,
) -> PatchHandle:
    """Install attnmem's processor on every cross-attention layer of a pipeline or UNet.

    Args:
        pipe_or_unet: a diffusers pipeline with ``.unet`` (SD1.x, SD2.x, SDXL) or a
            ``UNet2DConditionModel``.
        record: record statistics (True: every step and layer; a :class:`RecordSpec` or
            ``{"steps": [...], "layers": [...]}`` to limit them; False: none).
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
    controller = Controller(_as_record_spec(record), mitigate)
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(AttnMemProcessor(controller, name, m.processor))
    controller.patched_names = list(modules)
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
        ctl.abort_unet_call()
        return True
    finally:
        ctl.stop_after = ctl.stop_after_step = None
