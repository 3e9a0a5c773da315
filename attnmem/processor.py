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

from dataclasses import dataclass
from typing import Any

import torch

from attnmem import ops
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


class AttnMemProcessor:
    """diffusers attention processor (``AttnProcessor`` call signature) running attnmem's op.

    Installed only on cross-attention modules. Inputs the op cannot take (an attention mask,
    more than 128 keys, self-attention) go to the module's original processor.
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
        # Self-attention, an attention mask (attnmem masks by key length only) or more keys
        # than the op takes: the module's original processor runs it.
        if (
            encoder_hidden_states is None
            or attention_mask is not None
            or encoder_hidden_states.shape[1] > ops.MAX_KEYS
        ):
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
        index, key_len, bos_scale, want = ctl.layer_params(self.name, Nk, query.device)
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
