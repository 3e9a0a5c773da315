"""The tiny SD1 / SD2 / SDXL pipelines: they run, are seeded, and have the documented attn2 layout."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from attnmem.testing import (
    IMAGE_SIZE,
    describe,
    tiny_sd1_pipeline,
    tiny_sd2_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
)
from attnmem.tokenizer import encode_prompts

FACTORIES: dict[str, Callable[..., Any]] = {
    "sd1": tiny_sd1_pipeline,
    "sd2": tiny_sd2_pipeline,
    "sdxl": tiny_sdxl_pipeline,
}

# What the factories' docstrings promise: attn2 modules in execution order as
# (name without ".transformer_blocks.K.attn2", transformer block K, heads, head dim, Nq at 32×32).
_SD1 = (
    [(f"down_blocks.0.attentions.{i}", 0, 2, 40, 64) for i in range(2)]
    + [(f"down_blocks.1.attentions.{i}", 0, 2, 80, 16) for i in range(2)]
    + [("mid_block.attentions.0", 0, 2, 80, 4)]
    + [(f"up_blocks.1.attentions.{i}", 0, 2, 80, 16) for i in range(3)]
    + [(f"up_blocks.2.attentions.{i}", 0, 2, 40, 64) for i in range(3)]
)
_SD2 = (
    [(f"down_blocks.0.attentions.{i}", 0, 2, 64, 64) for i in range(2)]
    + [(f"down_blocks.1.attentions.{i}", 0, 4, 64, 16) for i in range(2)]
    + [("mid_block.attentions.0", 0, 4, 64, 4)]
    + [(f"up_blocks.1.attentions.{i}", 0, 4, 64, 16) for i in range(3)]
    + [(f"up_blocks.2.attentions.{i}", 0, 2, 64, 64) for i in range(3)]
)
_SDXL = (
    [(f"down_blocks.1.attentions.{i}", 0, 2, 64, 16) for i in range(2)]
    + [(f"down_blocks.2.attentions.{i}", k, 4, 64, 4) for i in range(2) for k in range(2)]
    + [("mid_block.attentions.0", k, 4, 64, 4) for k in range(2)]
    + [(f"up_blocks.0.attentions.{i}", k, 4, 64, 4) for i in range(3) for k in range(2)]
    + [(f"up_blocks.1.attentions.{i}", 0, 2, 64, 16) for i in range(3)]
)
LAYOUT = {"sd1": _SD1, "sd2": _SD2, "sdxl": _SDXL}
CROSS_DIM = {"sd1": 32, "sd2": 64, "sdxl": 96}

PROMPTS = ["a photo of a cat", "A Dog, wow!"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on shared CI cores OpenMP's
    spinning threads made a 0.2 s call take 2-15 s; one thread keeps every test fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=list(FACTORIES))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(kind: str) -> Any:
    return FACTORIES[kind](seed=0)


def _generate(pipe: Any, **kwargs: Any) -> np.ndarray:
    args: dict[str, Any] = dict(
        num_inference_steps=2,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
    )
    args.update(kwargs)
    return pipe(PROMPTS, **args).images


def _unet_batches(pipe: Any, run: Callable[[], Any]) -> list[tuple[int, tuple[int, ...]]]:
    """(batch size, encoder_hidden_states shape) of every UNet call made by ``run``."""
    calls: list[tuple[int, tuple[int, ...]]] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        calls.append((sample.shape[0], tuple(ehs.shape)))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "nocfg"])
def test_runs_end_to_end(pipe: Any, kind: str, guidance: float) -> None:
    images: list[np.ndarray] = []
    calls = _unet_batches(pipe, lambda: images.append(_generate(pipe, guidance_scale=guidance)))
    (image,) = images
    assert image.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    rows = 8 if guidance > 1 else 4  # CFG doubles the batch: [uncond × 4, cond × 4]
    assert calls == [(rows, (rows, 77, CROSS_DIM[kind]))] * 2  # one UNet call per DDIM step


def test_pipelines_stay_tiny(pipe: Any) -> None:
    """A size guard instead of a wall-clock one (CI cores are shared): ~0.2 s per call idle."""
    unet = sum(p.numel() for p in pipe.unet.parameters())
    assert unet < 40e6, f"UNet has {unet / 1e6:.1f} M parameters"


def test_cfg_batch_layout(pipe: Any) -> None:
    """UNet rows are [uncond × N·k, cond × N·k], each prompt's k images contiguous (docs/method.md §3)."""
    keys: list[torch.Tensor] = []
    first = describe(pipe)[0].name

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        keys.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = pipe.unet.get_submodule(first).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _generate(pipe, num_inference_steps=1)
    finally:
        handle.remove()
    (k,) = keys
    assert k.shape[0] == 8
    uncond, cond = k[:4], k[4:]
    assert all(torch.equal(uncond[0], row) for row in uncond)
    assert torch.equal(cond[0], cond[1]) and torch.equal(cond[2], cond[3])
    assert not torch.equal(cond[1], cond[2])
    assert not torch.equal(uncond[0], cond[0])


def test_attn2_layout(pipe: Any, kind: str) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    layers = describe(pipe)
    expected = LAYOUT[kind]
    assert [(x.name, x.heads, x.head_dim) for x in layers] == [
        (f"{block}.transformer_blocks.{k}.attn2", h, d) for block, k, h, d, _ in expected
    ]
    assert len(layers) == {"sd1": 11, "sd2": 11, "sdxl": 17}[kind]
    assert {x.head_dim for x in layers} == ({40, 80} if kind == "sd1" else {64})
    assert {x.cross_attention_dim for x in layers} == {CROSS_DIM[kind]}
    for x in layers:
        module = pipe.unet.get_submodule(x.name)
        assert isinstance(module, Attention) and module.is_cross_attention
        assert isinstance(module.processor, AttnProcessor2_0)
        assert x.query_dim == x.heads * x.head_dim
    if kind != "sdxl":  # the metric-E layer is the 4th attn2 in execution order, as in SD1.x
        assert layers[3].name == "down_blocks.1.attentions.1.transformer_blocks.0.attn2"


def test_describe_is_execution_order(pipe: Any, kind: str) -> None:
    seen: list[tuple[str, int]] = []
    handles = []
    for layer in describe(pipe):
        module = pipe.unet.get_submodule(layer.name)

        def hook(_module: Any, args: tuple, kwargs: dict, name: str = layer.name) -> None:
            seen.append((name, args[0].shape[1]))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _generate(pipe, num_inference_steps=1, guidance_scale=1.0, num_images_per_prompt=1)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [(x.name, nq) for x, (*_, nq) in zip(describe(pipe), LAYOUT[kind], strict=True)]
    # Registration order is not execution order: diffusers registers mid_block last.
    registered = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert registered != [name for name, _ in seen]


def test_text_encoders_see_encode_prompts_ids(pipe: Any, kind: str) -> None:
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if kind == "sdxl":
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    for encoder, tokenizer in pairs:
        seen: list[torch.Tensor] = []

        def hook(_module: Any, args: tuple, kwargs: dict, seen: list = seen) -> None:
            seen.append(kwargs.get("input_ids", args[0] if args else None))

        handle = encoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            _generate(pipe, num_inference_steps=1, guidance_scale=1.0, num_images_per_prompt=1)
        finally:
            handle.remove()
        assert torch.equal(seen[0], encode_prompts(tokenizer, PROMPTS).input_ids)


def test_same_seed_same_images(kind: str, pipe: Any) -> None:
    again = FACTORIES[kind](seed=0)
    a, b = _generate(pipe, num_inference_steps=1), _generate(again, num_inference_steps=1)
    assert np.array_equal(a, b)
    other = FACTORIES[kind](seed=1)
    assert not np.array_equal(a, _generate(other, num_inference_steps=1))


def test_factories_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_unet("sd1", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_sd2_upcast_attention_is_configurable() -> None:
    on = describe(tiny_sd2_pipeline())[0].name
    assert tiny_sd2_pipeline().unet.get_submodule(on).upcast_attention is True
    off = tiny_sd2_pipeline(upcast_attention=False)
    assert not any(m.upcast_attention for n, m in off.unet.named_modules() if n.endswith("attn2"))
    assert off.unet.config.use_linear_projection is True


@pytest.mark.parametrize("unet_kind", ["sd1", "sd2", "sdxl"])
def test_tiny_unet_forward(unet_kind: str) -> None:
    unet = tiny_unet(unet_kind)  # type: ignore[arg-type]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, CROSS_DIM[unet_kind])
    extra: dict[str, Any] = {}
    if unet_kind == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32),
            "time_ids": torch.zeros(2, 6),
        }
    with torch.no_grad():
        out = unet(latents, 10, encoder_hidden_states=ehs, **extra).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_tiny_unet_is_the_pipelines_unet(kind: str, pipe: Any) -> None:
    unet = tiny_unet(kind, seed=0)  # type: ignore[arg-type]
    assert unet.config.upcast_attention == pipe.unet.config.upcast_attention
    theirs = pipe.unet.state_dict()
    assert all(torch.equal(w, theirs[n]) for n, w in unet.state_dict().items())


def test_tiny_unet_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        tiny_unet("sd3")  # type: ignore[arg-type]


def test_import_attnmem_stays_light() -> None:
    code = (
        "import sys, attnmem, attnmem.testing\n"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(attnmem.clip_tokenizer) and callable(attnmem.lengths_from_ids)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
