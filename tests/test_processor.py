"""attnmem.patch on tiny SD1 / SD2 / SDXL pipelines: same images, exact restore, CFG layout,
recorded statistics against an explicit softmax, mitigation semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnmem
from attnmem.patching import PatchRemovedError, run_unet_until
from attnmem.processor import AttnMemProcessor
from attnmem.record import RecordSpec
from attnmem.testing import tiny_sd1_pipeline, tiny_sd2_pipeline, tiny_sdxl_pipeline
from attnmem.tokenizer import encode_prompts

PROMPTS = ["a photo of a cat", "a dog on the beach at sunset, oil painting", "x"]
FACTORIES = {"sd1": tiny_sd1_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for name, make in FACTORIES.items():
        p = make()
        p.set_progress_bar_config(disable=True)
        out[name] = p
    return out


def run(pipe, prompts=PROMPTS, n_img=2, guidance=7.5, steps=2, seed=0):
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=n_img,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def attn2_modules(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_stats_on_same_images_and_exact_restore(pipes, kind):
    pipe = pipes[kind]
    before = dict(pipe.unet.attn_processors)
    base = run(pipe)
    with attnmem.patch(pipe) as handle:
        procs = pipe.unet.attn_processors
        for name, proc in procs.items():
            if name.endswith("attn2.processor"):
                assert isinstance(proc, AttnMemProcessor)
            else:  # self-attention untouched, same objects
                assert proc is before[name]
        patched = run(pipe)
        rec = handle.record
    np.testing.assert_allclose(patched, base, atol=1e-4, rtol=0)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert "encode_prompt" not in vars(pipe)
    assert rec.n_images == len(PROMPTS) * 2 and rec.steps == [0, 1]
    assert len(rec.layers) == len(attn2_modules(pipe.unet))
    np.testing.assert_array_equal(run(pipe), base)


def test_patch_twice_is_harmless(pipes):
    pipe = pipes["sd1"]
    before = dict(pipe.unet.attn_processors)
    h1 = attnmem.patch(pipe)
    h2 = attnmem.patch(pipe, mitigate=attnmem.Mitigation())
    assert not h1.active and h2.active
    h1.remove()  # no-op
    assert isinstance(
        pipe.unet.attn_processors[
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
        ],
        AttnMemProcessor,
    )
    h2.remove()
    h2.remove()
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_lengths_and_cond_rows_match_explicit_softmax(pipes, kind, guidance):
    """Recorded a = prob_sum/Nq of the conditional rows equals an explicit softmax on the same
    q, k (captured with hooks), for 3 prompts x 2 images, with and without guidance."""
    pipe = pipes[kind]
    name = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    attn = dict(pipe.unet.named_modules())[name]
    seen = []
    hooks = [
        attn.to_q.register_forward_hook(lambda m, i, o: seen.append(("q", o.detach()))),
        attn.to_k.register_forward_hook(lambda m, i, o: seen.append(("k", o.detach()))),
    ]
    try:
        with attnmem.patch(pipe) as handle:
            run(pipe, guidance=guidance, steps=1)
            rec = handle.record
    finally:
        for h in hooks:
            h.remove()
    enc = encode_prompts(pipe.tokenizer, PROMPTS)
    assert rec.lengths.tolist() == enc.lengths.tolist()
    q = dict(seen)["q"]
    k = dict(seen)["k"]
    B = q.shape[0]
    n = len(PROMPTS) * 2
    assert B == (2 * n if guidance > 1 else n)
    H = attn.heads
    D = q.shape[-1] // H
    qh = q.view(B, -1, H, D).transpose(1, 2).double()
    kh = k.view(B, -1, H, D).transpose(1, 2).double()
    p = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)  # (B, H, Nq, 77)
    cond = slice(n, 2 * n) if guidance > 1 else slice(0, n)
    expected = p.mean(dim=2)[cond]
    torch.testing.assert_close(rec.attn[0][name].double(), expected, atol=1e-5, rtol=1e-4)
    ent = -(p * torch.log(p)).sum(-1).mean(-1)[cond]
    torch.testing.assert_close(rec.mean_entropy[0][name].double(), ent, atol=1e-4, rtol=1e-4)
    # entropy of the mean distribution over this one layer
    abar = expected.mean(dim=1)
    torch.testing.assert_close(
        rec.entropy(steps=0, layers=name).double(),
        -(abar * abar.log()).sum(-1),
        atol=1e-5,
        rtol=1e-5,
    )


def test_sd2_lengths_with_bang_padding(pipes):
    pipe = pipes["sd2"]
    assert pipe.tokenizer.pad_token_id == 0  # "!"
    with attnmem.patch(pipe) as handle:
        run(pipe, prompts=["hello world !", "a cat"], n_img=1, steps=1)
    ids = encode_prompts(pipe.tokenizer, ["hello world !", "a cat"]).input_ids
    naive = (ids != 0).sum(-1)  # counting non-pad ids: wrong when the prompt contains "!"
    assert handle.record.lengths.tolist() == [5, 4]
    assert naive.tolist() != [5, 4]


def test_sdxl_records_all_layers(pipes):
    pipe = pipes["sdxl"]
    with attnmem.patch(pipe) as handle:
        run(pipe, n_img=1, steps=1)
    rec = handle.record
    assert rec.lengths.tolist() == encode_prompts(pipe.tokenizer, PROMPTS).lengths.tolist()
    assert rec.lengths.tolist() == encode_prompts(pipe.tokenizer_2, PROMPTS).lengths.tolist()
    assert len(rec.layers) == len(attn2_modules(pipe.unet))
    for name in rec.layers:
        a = rec.attn[0][name]
        assert a.shape[0] == 3 and a.shape[-1] == 77
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5, rtol=0)


def test_record_limits(pipes):
    pipe = pipes["sd1"]
    with attnmem.patch(pipe, record=RecordSpec(steps=(1,), layers=(3, "mid_block"))) as handle:
        run(pipe, steps=3)
    rec = handle.record
    assert rec.steps == [1]
    assert rec.layers == [
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
    ]


def test_mitigation_identity_equals_plain(pipes):
    pipe = pipes["sd1"]
    base = run(pipe)
    with attnmem.patch(pipe, record=False, mitigate=attnmem.Mitigation(bos_scale=1.0, mask="none")):
        same = run(pipe)
    np.testing.assert_allclose(same, base, atol=1e-4, rtol=0)
    with attnmem.patch(pipe, record=False, mitigate=attnmem.Mitigation()):
        changed = run(pipe)
    assert np.abs(changed - base).max() > 1e-3


def _first_layer_outputs(pipe, handle_kwargs, lengths, n_rows):
    """attn2 output of the first cross-attention layer in one direct UNet call with CFG."""
    unet = pipe.unet
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = dict(unet.named_modules())[first]
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    sample = torch.randn(2 * n_rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ehs = torch.randn(2 * n_rows, 77, cfg.cross_attention_dim, generator=g)
    got = {}
    hook = attn.register_forward_hook(lambda m, i, o: got.setdefault("out", o.detach()))
    try:
        if handle_kwargs is None:
            with torch.no_grad():
                unet(sample, 10, encoder_hidden_states=ehs)
        else:
            with attnmem.patch(unet, **handle_kwargs) as handle, torch.no_grad():
                handle.set_prompts(lengths=lengths, n_rows=n_rows, cfg=True)
                unet(sample, 10, encoder_hidden_states=ehs)
    finally:
        hook.remove()
    return got["out"], attn


def test_mitigation_changes_only_what_it_should(pipes):
    pipe = pipes["sd1"]
    lengths = [5, 9]
    n = 2
    plain, _ = _first_layer_outputs(pipe, None, lengths, n)
    # bos_scale only: unconditional rows are untouched, conditional rows change
    c1_only, _ = _first_layer_outputs(
        pipe,
        dict(record=False, mitigate=attnmem.Mitigation(bos_scale=2.0, mask="none")),
        lengths,
        n,
    )
    torch.testing.assert_close(c1_only[:n], plain[:n], atol=1e-5, rtol=0)
    assert (c1_only[n:] - plain[n:]).abs().max() > 1e-4
    # masking with uncond="unmasked": uncond rows untouched
    masked, _ = _first_layer_outputs(
        pipe,
        dict(record=False, mitigate=attnmem.Mitigation(bos_scale=1.0, uncond="unmasked")),
        lengths,
        n,
    )
    torch.testing.assert_close(masked[:n], plain[:n], atol=1e-5, rtol=0)
    assert (masked[n:] - plain[n:]).abs().max() > 1e-4
    # official: uncond rows are masked with their conditional prompt's L
    official, _ = _first_layer_outputs(
        pipe, dict(record=False, mitigate=attnmem.Mitigation(bos_scale=1.0)), lengths, n
    )
    assert (official[:n] - plain[:n]).abs().max() > 1e-4
    torch.testing.assert_close(official[n:], masked[n:], atol=1e-5, rtol=0)


def test_mitigated_statistics_match_explicit_rescale_and_mask(pipes):
    pipe = pipes["sd1"]
    unet = pipe.unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = dict(unet.named_modules())[name]
    seen = {}
    hooks = [
        attn.to_q.register_forward_hook(lambda m, i, o: seen.setdefault("q", o.detach())),
        attn.to_k.register_forward_hook(lambda m, i, o: seen.setdefault("k", o.detach())),
    ]
    lengths, n, bos_scale = [5, 9], 2, 1.5
    g = torch.Generator().manual_seed(2)
    cfg = unet.config
    sample = torch.randn(2 * n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ehs = torch.randn(2 * n, 77, cfg.cross_attention_dim, generator=g)
    try:
        with (
            attnmem.patch(
                unet, mitigate=attnmem.Mitigation(bos_scale=bos_scale, mask="padding+eos")
            ) as handle,
            torch.no_grad(),
        ):
            handle.set_prompts(lengths=lengths, n_rows=n, cfg=True)
            unet(sample, 10, encoder_hidden_states=ehs)
    finally:
        for h in hooks:
            h.remove()
    H = attn.heads
    q, k = seen["q"], seen["k"]
    D = q.shape[-1] // H
    s = (
        q.view(2 * n, -1, H, D).transpose(1, 2).double()
        @ k.view(2 * n, -1, H, D).transpose(1, 2).double().transpose(-1, -2)
    ) * attn.scale
    s[n:, :, :, 0] *= bos_scale  # conditional rows only
    keep = torch.arange(77)[None, :] < torch.tensor([L - 1 for L in lengths] * 2)[:, None]
    s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    p = s.softmax(-1)
    torch.testing.assert_close(
        handle.record.attn[0][name].double(), p.mean(2)[n:], atol=1e-5, rtol=1e-4
    )
    assert (handle.record.attn[0][name][:, :, 8:] == 0).all()


def test_direct_unet_needs_consistent_batch(pipes):
    unet = pipes["sd1"].unet
    cfg = unet.config
    sample = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ehs = torch.randn(3, 77, cfg.cross_attention_dim)
    with attnmem.patch(unet) as handle, torch.no_grad():
        handle.set_prompts(lengths=[5, 6], cfg=True)
        with pytest.raises(ValueError, match="UNet batch has 3 rows"):
            unet(sample, 10, encoder_hidden_states=ehs)


def test_memory_helper_replacing_processors_is_reported(pipes):
    pipe = tiny_sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = attnmem.patch(pipe)
    pipe.enable_attention_slicing()
    with pytest.raises(PatchRemovedError, match="replaced after attnmem.patch"):
        run(pipe, steps=1)
    handle.remove()


def test_early_exit_stops_after_layer(pipes):
    unet = pipes["sd1"].unet
    cfg = unet.config
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ehs = torch.randn(2, 77, cfg.cross_attention_dim)
    calls = []
    last = "up_blocks.2.attentions.2.transformer_blocks.0.attn2"
    hook = dict(unet.named_modules())[last].register_forward_hook(lambda *a: calls.append(1))
    try:
        with attnmem.patch(unet) as handle, torch.no_grad():
            handle.set_prompts(lengths=[5, 6], cfg=False)
            stopped = run_unet_until(handle, 3, lambda: unet(sample, 10, encoder_hidden_states=ehs))
            assert stopped and not calls
            rec = handle.record
            assert rec.steps == [0] and len(rec.layers) == 4
            # a second full call still works and records step 1
            unet(sample, 10, encoder_hidden_states=ehs)
            assert rec.steps == [0, 1] and calls
    finally:
        hook.remove()


def test_bad_arguments():
    pipe = tiny_sd1_pipeline()
    with pytest.raises(ValueError, match="mitigate must be an attnmem.Mitigation"):
        attnmem.patch(pipe, mitigate=1.25)
    with pytest.raises(ValueError, match="expected a diffusers pipeline"):
        attnmem.patch(object())
    with pytest.raises(ValueError, match="bos_scale must be a finite number"):
        attnmem.Mitigation(bos_scale=float("nan"))
    with pytest.raises(ValueError, match="mask must be"):
        attnmem.Mitigation(mask="eos")
