"""The diffusers attention processor that runs attnmem's op, and its per-call controller.

:class:`AttnMemProcessor` replaces the processor of each cross-attention module (``attn2``);
all of them share one :class:`Controller`, which knows, for the current UNet call:

- the prompts' lengths L and which UNet batch rows are conditional (:class:`PromptBatch`).
  With classifier-free guidance the batch is ``[uncond x n, cond x n]`` with
  ``n = prompts x num_images_per_prompt`` and one prompt's images contiguous; without it every
  row is conditional;
- the step index (UNet calls since the pipeline call began), what to record
  (:class:`attnmem.record.RecordSpec`) and what to mitigate (:class:`attnmem.mitigate.Mitigation`,
  which lays its settings out per row).

Per-call state lives here and not in ``cross_attention_kwargs`` (which would also reach attn1
and warn on every call). Statistics stay on the device until the UNet call ends (no host sync
per layer); the controller hands them to the :class:`attnmem.record.AttentionRecord` of the
current generation. Installing and removing the processors is :mod:`attnmem.patching`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from attnmem import ops, reference
from attnmem.mitigate import Mitigation
from attnmem.record import AttentionRecord, RecordSpec

__all__ = ["AttnMemProcessor", "Controller", "PromptBatch", "EarlyExit"]


class EarlyExit(Exception):
    """Raised by a processor to stop the UNet forward once the requested layer has run."""


@dataclass
class PromptBatch:
    """What the controller knows about the prompts of the current generation."""

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
        self.prompts: PromptBatch | None = None
        self.step = 0
        self.records: list[AttentionRecord] = []
        self.stop_after: str | int | None = None  # early exit after this layer (name or index)
        self.stop_after_step: int | None = None  # early exit once this UNet call has ended
        self._call: dict[str, Any] | None = None
        self._row_cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._warned: set[str] = set()

    def fallback(self, name: str, why: str, consequence: str) -> None:
        """An input attnmem's kernel cannot take: warn once per reason (per patch), or raise
        under :func:`attnmem.strict` / ``ATTNMEM_STRICT=1``."""
        message = f"attnmem: {name}: {why}; {consequence}"
        if ops.is_strict():
            raise RuntimeError(message + " (refused: strict mode is on)")
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(message + " (warned once per patch)", stacklevel=2)

    # -- call boundaries ------------------------------------------------------------------------
    def begin_prompts(self, prompts: PromptBatch) -> None:
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
            p = PromptBatch(n_rows=batch, images_per_prompt=1, lengths=None, cfg=False)
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
        key_len, bos_scale = self._row_tensors(Nk, device)
        return index, key_len, bos_scale, want

    def _row_tensors(
        self, Nk: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mitigation's per-row key_len and bos_scale (attnmem.mitigate), built once per
        batch layout and device."""
        call, p = self._call, self.prompts
        key = (call["batch"], call["cfg"], Nk, str(device))
        if key not in self._row_cache:
            lengths = None if p.lengths is None else p.lengths.tolist()
            self._row_cache[key] = self.mitigation.per_row(
                p.n_rows, call["cfg"], lengths, p.images_per_prompt, Nk, device
            )
        return self._row_cache[key]

    def store(self, name: str, prob_sum: torch.Tensor, ent_sum: torch.Tensor, Nq: int) -> None:
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


def _key_mask(mask: torch.Tensor, B: int, Nk: int) -> torch.Tensor | None:
    """The (B, Nk) boolean key mask (True = attend) of an ``attention_mask`` given to a
    cross-attention module, or None when it is not a key mask attnmem can apply: a boolean
    mask, or diffusers' additive bias from ``encoder_attention_mask`` (0 = attend, -10000 =
    masked; any value <= -1000 is a zero probability in fp32), of shape (B, Nk) or (B, 1, Nk).
    A mask that differs per query, or a soft bias, is not."""
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 2 or mask.shape != (B, Nk):
        return None
    if mask.dtype == torch.bool:
        return mask
    if not mask.dtype.is_floating_point:
        return None
    keep = mask == 0
    if not bool((keep | (mask <= -1000)).all()):
        return None
    return keep


class AttnMemProcessor:
    """diffusers attention processor (``AttnProcessor`` call signature) running attnmem's op.

    Installed only on cross-attention modules. Inputs the compiled kernel cannot take, more
    than 128 text tokens (long-prompt embeddings) or an ``encoder_attention_mask``, run on the
    reference (:mod:`attnmem.reference`) with the same mitigation and statistics, with a
    warning once (an error in strict mode). A mask that is not a key mask (it differs per
    query, or is a soft bias) cannot take attnmem's mitigation: that layer runs the original
    processor, with the same warning or error.
    """

    def __init__(self, controller: Controller, name: str, original: Any):
        self.controller = controller
        self.name = name
        self.original = original

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
        ctl = self.controller
        if encoder_hidden_states is None:  # self-attention: not attnmem's
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                f"attnmem: {self.name} received (text, image) embeddings: an IP-Adapter is "
                "active, which attnmem does not support; call pipe.unload_ip_adapter() before "
                "attnmem.patch()"
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        B, Nq, _ = hidden_states.shape
        Nk = encoder_hidden_states.shape[1]

        index, key_len, bos_scale, want = ctl.layer_params(self.name, Nk, hidden_states.device)
        key_mask = None
        if attention_mask is not None:
            key_mask = _key_mask(attention_mask, B, Nk)
            if key_mask is None:
                ctl.fallback(
                    self.name,
                    f"an attention mask of shape {tuple(attention_mask.shape)} that is not a "
                    "boolean or 0/-10000 key mask",
                    "this layer runs its original processor: no mitigation, no statistics",
                )
                out = self.original(
                    attn, residual, encoder_hidden_states, attention_mask, temb, *args, **kwargs
                )
                if ctl.should_stop(self.name, index):
                    raise EarlyExit(self.name)
                return out

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        H = attn.heads
        D = key.shape[-1] // H
        # (B, N, H*D) -> (B, N, H, D) views: the op reads diffusers' layout without copies.
        query = query.view(B, Nq, H, D)
        key = key.view(B, Nk, H, D)
        value = value.view(B, Nk, H, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if Nk > ops.MAX_KEYS or key_mask is not None:
            why = (
                f"{Nk} text tokens (the compiled kernel takes at most {ops.MAX_KEYS})"
                if Nk > ops.MAX_KEYS
                else "an encoder_attention_mask"
            )
            ctl.fallback(
                self.name,
                why,
                "it runs on attnmem's PyTorch reference (same mitigation and statistics, slower)",
            )
            out, prob_sum, ent_sum, _ = reference.cross_attention(
                query,
                key,
                value,
                key_len=key_len,
                bos_scale=bos_scale,
                scale=attn.scale,
                stats=want,
                key_mask=key_mask,
            )
        else:
            out, prob_sum, ent_sum, _ = ops.cross_attention_unchecked(
                query, key, value, key_len, bos_scale, attn.scale, want
            )
        if want:
            ctl.store(self.name, prob_sum, ent_sum, Nq)
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
