"""Tiny Stable Diffusion pipelines with random weights, for tests that must run on CPU in seconds.

Real SD checkpoints cannot be downloaded here and a full SD1 UNet takes ~30 s per forward on two
cores, so tests use these instead. They keep what attnmem's attention processor and pipeline
hook depend on, and shrink everything else:

- the real CLIP tokenizer (:mod:`attnmem.tokenizer`), 77 positions, vocabulary 49408, the SD1
  (EOS) and SD2 (``!``) paddings, SDXL's two tokenizers;
- SD's UNet topology in miniature: cross-attention (``attn2``) in down, mid and up blocks,
  ``down_blocks.1.attentions.1`` as the 4th ``attn2`` in execution order (the metric-E layer),
  several heads per layer, and the head dims the kernels specialise on (SD1: 40 and 80; SD2 and
  SDXL: 64); SD2's ``use_linear_projection`` and ``upcast_attention``; SDXL's ``text_time``
  added conditioning and several transformer blocks per attention;
- standard diffusers ``Attention`` modules with their default processors;
- SD's DDIM noise schedule, so ``num_inference_steps`` = number of UNet calls.

The VAE downsamples by 4 (SD: 8) and the UNets' ``sample_size`` is 8, so the default image is
32×32 and the latent 8×8: Nq = 64 / 16 / 4 at the three UNet levels.

Example::

    pipe = tiny_sd1_pipeline()
    images = pipe(["a photo of a cat", "a dog"], num_inference_steps=2, output_type="np").images
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnmem.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, SD2_PAD_ID, clip_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

__all__ = [
    "IMAGE_SIZE",
    "SD_SCHEDULE",
    "Attn2Layer",
    "describe",
    "tiny_unet",
    "tiny_sd1_pipeline",
    "tiny_sd2_pipeline",
    "tiny_sdxl_pipeline",
]

Kind = Literal["sd1", "sd2", "sdxl"]

IMAGE_SIZE = 32  # default height and width of the tiny pipelines (latent 8×8)
_LATENT_SIZE = 8
_VAE_CHANNELS = (8, 16, 16)  # three levels: the VAE scales by 4

# SD's noise schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps).
SD_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)

# UNet configs. NB diffusers' legacy naming: `attention_head_dim` is the number of HEADS
# (passing `num_attention_heads` raises); the head dim D is channels / heads.
_UNETS: dict[str, dict[str, Any]] = {
    # SD1.x-like: 2 heads, D = 80/2 = 40 at level 0 and 160/2 = 80 at level 1 and mid.
    "sd1": dict(
        block_out_channels=(80, 160, 160),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=16,
    ),
    # SD2.x-like: heads grow with channels (SD2: 5/10/20) so that D = 64 everywhere.
    "sd2": dict(
        block_out_channels=(128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        norm_num_groups=32,
    ),
    # SDXL-like: no attention at level 0, D = 64, 1 then 2 transformer blocks per attention
    # (SDXL: 2 then 10), text_time added conditioning: 6 size numbers × 8 + pooled 32 = 80.
    "sdxl": dict(
        block_out_channels=(32, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=96,  # 32 (text_encoder) + 64 (text_encoder_2), concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    ),
}


@dataclass(frozen=True)
class Attn2Layer:
    """One cross-attention module of a UNet.

    Attributes:
        name: module name in the UNet, e.g. ``down_blocks.1.attentions.1.transformer_blocks.0.attn2``.
        heads: number of heads H.
        head_dim: D = inner dim / H.
        query_dim: channels of the latent features (the queries' input width).
        cross_attention_dim: width of the text embeddings (the keys' input width).
    """

    name: str
    heads: int
    head_dim: int
    query_dim: int
    cross_attention_dim: int


_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def describe(pipe_or_unet: Any) -> list[Attn2Layer]:
    """The ``attn2`` modules of a pipeline's UNet (or of a UNet), in execution order.

    Execution order is down blocks, mid block, up blocks, each in index order; module
    registration order is not (diffusers registers ``mid_block`` after ``up_blocks``), nor is
    the order of ``unet.attn_processors``.
    """
    from diffusers.models.attention_processor import Attention

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    found = [
        (name, m)
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention and name.endswith("attn2")
    ]
    order = {name: i for i, (name, _) in enumerate(found)}
    found.sort(key=lambda nm: (_SECTION_ORDER.get(nm[0].split(".")[0], 3), order[nm[0]]))
    return [
        Attn2Layer(
            name=name,
            heads=m.heads,
            head_dim=m.inner_dim // m.heads,
            query_dim=m.query_dim,
            cross_attention_dim=m.cross_attention_dim,
        )
        for name, m in found
    ]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed weight initialisation without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _unet(kind: Kind, upcast_attention: bool) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    if kind not in _UNETS:
        raise ValueError(f"kind must be one of {sorted(_UNETS)}, got {kind!r}")
    return UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        upcast_attention=upcast_attention,
        **_UNETS[kind],
    )


def tiny_unet(
    kind: Kind = "sd1", seed: int = 0, *, upcast_attention: bool | None = None
) -> UNet2DConditionModel:
    """The UNet of :func:`tiny_sd1_pipeline` / :func:`tiny_sd2_pipeline` / :func:`tiny_sdxl_pipeline`.

    Same weights as the pipeline's UNet for the same seed; ``upcast_attention=None`` takes the
    pipeline's default (True for SD2). For tests that drive the UNet directly: latents
    ``(B, 4, 8, 8)``, a timestep, ``encoder_hidden_states`` ``(B, 77, cross_attention_dim)``
    (32 / 64 / 96); SDXL also needs ``added_cond_kwargs={"text_embeds": (B, 32),
    "time_ids": (B, 6)}``.
    """
    if upcast_attention is None:
        upcast_attention = kind == "sd2"
    with _seeded(seed):
        return _unet(kind, upcast_attention).eval()


def _vae(scaling_factor: float) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    ).eval()


def _text_encoder(
    hidden: int, act: str, pad_id: int, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        hidden_act=act,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # pooled output = first EOS, whatever the padding
        pad_token_id=pad_id,
        projection_dim=projection_dim or hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def _ddim(prediction_type: str) -> DDIMScheduler:
    from diffusers import DDIMScheduler

    return DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULE)


def _sd_pipeline(
    seed: int,
    kind: Literal["sd1", "sd2"],
    upcast_attention: bool,
    *,
    hidden: int,
    act: str,
    prediction: str,
) -> StableDiffusionPipeline:
    """SD1/SD2-shaped pipeline: the two differ only in UNet, text width/activation, padding
    style and prediction type."""
    from diffusers import StableDiffusionPipeline

    with _seeded(seed):
        unet = _unet(kind, upcast_attention=upcast_attention)
        vae = _vae(scaling_factor=0.18215)
        text_encoder = _text_encoder(
            hidden=hidden, act=act, pad_id=EOS_ID if kind == "sd1" else SD2_PAD_ID
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(kind),
        unet=unet.eval(),
        scheduler=_ddim(prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A seeded, random-weight ``StableDiffusionPipeline`` shaped like SD1.x.

    11 ``attn2`` layers, 2 heads each (SD1: 16 layers, 8 heads), in execution order::

        down_blocks.0.attentions.{0,1}   D 40  Nq 64   (query dim 80)
        down_blocks.1.attentions.{0,1}   D 80  Nq 16   (query dim 160)  <- 4th: metric-E layer
        mid_block.attentions.0           D 80  Nq 4
        up_blocks.1.attentions.{0,1,2}   D 80  Nq 16
        up_blocks.2.attentions.{0,1,2}   D 40  Nq 64

    (each ``….transformer_blocks.0.attn2``; Nq at the default 32×32 image). Text encoder:
    CLIP, hidden 32 = cross-attention dim, ``quick_gelu``; tokenizer pads with EOS (49407).
    DDIM with SD's schedule, epsilon prediction; no safety checker.
    """
    return _sd_pipeline(seed, "sd1", False, hidden=32, act="quick_gelu", prediction="epsilon")


def tiny_sd2_pipeline(seed: int = 0, *, upcast_attention: bool = True) -> StableDiffusionPipeline:
    """A seeded, random-weight ``StableDiffusionPipeline`` shaped like SD2.1-768.

    11 ``attn2`` layers, D = 64 everywhere, heads growing with width (SD2: 5/10/20)::

        down_blocks.0.attentions.{0,1}   H 2  Nq 64   (query dim 128)
        down_blocks.1.attentions.{0,1}   H 4  Nq 16   (query dim 256)  <- 4th: metric-E layer
        mid_block.attentions.0           H 4  Nq 4
        up_blocks.1.attentions.{0,1,2}   H 4  Nq 16
        up_blocks.2.attentions.{0,1,2}   H 2  Nq 64

    ``use_linear_projection=True``; ``upcast_attention`` as given (SD2.1-768: True). Text
    encoder: hidden 64 = cross-attention dim, ``gelu``; tokenizer pads with ``!`` (id 0), and,
    like the hub's SD2 tokenizer, turns every ``!`` in a prompt into id 0 too. DDIM,
    v-prediction; no safety checker.
    """
    return _sd_pipeline(
        seed, "sd2", upcast_attention, hidden=64, act="gelu", prediction="v_prediction"
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A seeded, random-weight ``StableDiffusionXLPipeline`` shaped like SDXL base.

    17 ``attn2`` layers (SDXL: 70), D = 64 everywhere, several transformer blocks per
    attention as in SDXL::

        down_blocks.1.attentions.{0,1}.transformer_blocks.0          H 2  Nq 16  (query dim 128)
        down_blocks.2.attentions.{0,1}.transformer_blocks.{0,1}      H 4  Nq 4   (query dim 256)
        mid_block.attentions.0.transformer_blocks.{0,1}              H 4  Nq 4
        up_blocks.0.attentions.{0,1,2}.transformer_blocks.{0,1}      H 4  Nq 4
        up_blocks.1.attentions.{0,1,2}.transformer_blocks.0          H 2  Nq 16

    Two text encoders on the same 77 positions: ``text_encoder`` (CLIP, hidden 32, pads with
    EOS) and ``text_encoder_2`` (with projection, hidden 64, projection 32, pads with ``!``);
    their penultimate hidden states are concatenated into keys of width 96. ``text_time``
    added conditioning (6 × 8 + 32 = 80 inputs). DDIM, epsilon prediction; no watermarker.
    """
    from diffusers import StableDiffusionXLPipeline

    with _seeded(seed):
        unet = _unet("sdxl", upcast_attention=False)
        vae = _vae(scaling_factor=0.13025)
        text_encoder = _text_encoder(hidden=32, act="quick_gelu", pad_id=EOS_ID)
        text_encoder_2 = _text_encoder(hidden=64, act="gelu", pad_id=SD2_PAD_ID, projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer("sd1"),
        tokenizer_2=clip_tokenizer("sd2"),
        unet=unet.eval(),
        scheduler=_ddim("epsilon"),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
