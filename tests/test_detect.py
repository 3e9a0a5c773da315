"""Detection metrics against independent computations on tiny pipelines (no attnmem processor
in the reference path: explicit softmax on q/k captured with forward hooks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnmem.detect import (
    CarliniDetector,
    EntropyD,
    EntropyE,
    WenDetector,
    generators,
    initial_latents,
    make_detector,
    tiled_l2,
    token_view,
)
from attnmem.testing import describe, tiny_sd1_pipeline, tiny_sd2_pipeline
from attnmem.tokenizer import encode_prompts

PROMPTS = ["a photo of a cat", "a dog on the beach at sunset", "x"]
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sd1_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def explicit_attention(pipe, prompts, seeds, steps, guidance, layers):
    """a[step][layer] (n_images, heads, 77) of the conditional rows via hooks + explicit softmax,
    with attnmem not involved."""
    mods = dict(pipe.unet.named_modules())
    captured: dict[str, list] = {name: [] for name in layers}
    hooks = []
    for name in layers:
        attn = mods[name]
        hooks.append(
            attn.to_q.register_forward_hook(
                lambda m, i, o, n=name: captured[n].append(["q", o.detach()])
            )
        )
        hooks.append(
            attn.to_k.register_forward_hook(
                lambda m, i, o, n=name: captured[n].append(["k", o.detach()])
            )
        )
    try:
        pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators(seeds),
            output_type="latent",
        )
    finally:
        for h in hooks:
            h.remove()
    out: dict[int, dict[str, torch.Tensor]] = {}
    n = len(prompts)
    for name in layers:
        attn = mods[name]
        seq = captured[name]
        for t in range(steps):
            q, k = seq[2 * t][1], seq[2 * t + 1][1]
            B, H = q.shape[0], attn.heads
            D = q.shape[-1] // H
            qh = q.view(B, -1, H, D).transpose(1, 2).double()
            kh = k.view(B, -1, H, D).transpose(1, 2).double()
            p = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)
            cond = slice(n, 2 * n) if guidance > 1 else slice(0, n)
            out.setdefault(t, {})[name] = p.mean(dim=2)[cond]
    return out


def ent(p):
    return -(p * torch.log(p)).sum(-1)


def test_metric_e_matches_explicit_computation(pipe):
    layer = describe(pipe)[3].name
    assert layer.startswith("down_blocks.1.attentions.1")
    ref = explicit_attention(pipe, PROMPTS, SEEDS, steps=1, guidance=1.0, layers=[layer])
    expected = ent(ref[0][layer].mean(dim=1))
    res = EntropyE(pipe, num_inference_steps=1).score_batch(PROMPTS, SEEDS)
    np.testing.assert_allclose([r["score"] for r in res], expected.numpy(), rtol=1e-5, atol=1e-6)
    # the per-token view is that same mean distribution
    np.testing.assert_allclose(res[0]["attention"], ref[0][layer].mean(dim=1)[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("make", [tiny_sd1_pipeline, tiny_sd2_pipeline], ids=["sd1", "sd2"])
def test_early_exit_equals_full_cfg_run(make):
    p = make()
    p.set_progress_bar_config(disable=True)
    for layer in (3, describe(p)[5].name):
        fast = EntropyE(p, layer=layer, num_inference_steps=5).score_batch(PROMPTS, SEEDS)
        full = EntropyE(p, layer=layer, num_inference_steps=5, early_exit=False).score_batch(
            PROMPTS, SEEDS
        )
        np.testing.assert_allclose(
            [r["score"] for r in fast], [r["score"] for r in full], rtol=1e-5
        )
        assert fast[0]["forwards"] == 1 and full[0]["forwards"] == 2


def test_early_exit_runs_part_of_one_unet_call(pipe):
    calls = []
    last = describe(pipe)[-1].name
    h = dict(pipe.unet.named_modules())[last].register_forward_hook(lambda *a: calls.append(1))
    try:
        EntropyE(pipe, num_inference_steps=50).score_batch(PROMPTS[:1], SEEDS[:1])
    finally:
        h.remove()
    assert calls == []


def test_metric_d_matches_explicit_computation(pipe):
    steps, last = 4, 2
    layers = [a.name for a in describe(pipe)]
    ref = explicit_attention(pipe, PROMPTS, SEEDS, steps=steps, guidance=7.5, layers=layers)
    L = encode_prompts(pipe.tokenizer, PROMPTS).lengths

    def abar(t):
        return torch.stack([ref[t][n].mean(dim=1) for n in layers]).mean(dim=0)  # (n, 77)

    def partial(a):
        keep = torch.arange(77)[None, :] >= (L - 1)[:, None]
        return -(torch.where(keep, a * torch.log(a), torch.zeros_like(a))).sum(-1)

    e_last = torch.stack([ent(abar(t)) for t in range(steps - last, steps)]).mean(0)
    p_last = torch.stack([partial(abar(t)) for t in range(steps - last, steps)]).mean(0)
    expected = e_last + p_last - partial(abar(0))
    res = EntropyD(pipe, num_inference_steps=steps, last=last).score_batch(PROMPTS, SEEDS)
    np.testing.assert_allclose([r["score"] for r in res], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert res[0]["entropy_steps"]["steps"] == list(range(steps))
    np.testing.assert_allclose(
        res[1]["entropy_steps"]["entropy"],
        [float(ent(abar(t))[1]) for t in range(steps)],
        atol=1e-5,
    )


def test_wen_matches_explicit_noise_difference(pipe):
    n = 2
    det = WenDetector(pipe, num_inference_steps=10, n=n, start=0, end=2)
    got = det.norms(PROMPTS, SEEDS)  # (2 steps, 6)
    outs = []
    h = pipe.unet.register_forward_hook(
        lambda m, a, o: outs.append(o[0].detach() if isinstance(o, tuple) else o.sample.detach())
    )
    try:
        pipe(
            PROMPTS,
            num_inference_steps=10,
            guidance_scale=7.5,
            num_images_per_prompt=n,
            generator=generators(SEEDS, n),
            output_type="latent",
        )
    finally:
        h.remove()
    for t in range(2):
        u, c = outs[t].chunk(2)
        torch.testing.assert_close(got[t], (c - u).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    scores = [r["score"] for r in det.score_batch(PROMPTS, SEEDS)]
    np.testing.assert_allclose(scores, got.mean(0).view(3, n).mean(1).numpy(), rtol=1e-6)


def test_same_seeds_same_latents_across_methods(pipe):
    """E and Wen n=1 start from the same x_T for a prompt (generation 0 of its seed)."""
    seen = []
    h = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["sample"]).detach().clone()),
        with_kwargs=True,
    )
    try:
        EntropyE(pipe, num_inference_steps=5).score_batch(PROMPTS, SEEDS)
        WenDetector(pipe, num_inference_steps=5).score_batch(PROMPTS, SEEDS)
    finally:
        h.remove()
    e_latents, wen_latents = seen[0], seen[1]
    torch.testing.assert_close(e_latents, wen_latents[3:])  # Wen's batch is [uncond, cond]


def _unet_inputs(pipe, fn):
    """The latents each UNet call of ``fn()`` received."""
    seen = []
    h = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["sample"]).detach().clone()),
        with_kwargs=True,
    )
    try:
        fn()
    finally:
        h.remove()
    return seen


def test_seeding_rule_is_what_the_pipeline_draws(pipe):
    """Generation j of seed s starts from torch.Generator().manual_seed(1000 s + j) noise, drawn
    as the pipeline draws it; a generator per prompt draws its n latents in one call."""
    n = 2
    x, _ = initial_latents(pipe, 2, n, seeds=[7, 8])
    for k, (s, j) in enumerate([(7, 0), (7, 1), (8, 0), (8, 1)]):
        g = torch.Generator().manual_seed(1000 * s + j)
        torch.testing.assert_close(x[k], torch.randn(4, 8, 8, generator=g), rtol=0, atol=0)
    # per prompt: each prompt's n latents from its generator in one call
    gp = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    xp, _ = initial_latents(pipe, 2, n, generator=gp)
    ref = torch.cat(
        [torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    )
    torch.testing.assert_close(xp, ref, rtol=0, atol=0)
    # one generator: what pipe(generator=g) itself draws for the whole batch
    seen = _unet_inputs(
        pipe,
        lambda: pipe(
            PROMPTS[:2],
            num_inference_steps=1,
            num_images_per_prompt=n,
            generator=torch.Generator().manual_seed(9),
            output_type="latent",
        ),
    )
    x1, _ = initial_latents(pipe, 2, n, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(seen[0][2 * n :], x1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 generators for 2 prompts x 2"):
        initial_latents(pipe, 2, n, generator=gp + gp[:1])
    with pytest.raises(ValueError, match=r"latents must have shape \(4, 4, 8, 8\)"):
        initial_latents(pipe, 2, n, latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="give seeds, generator or latents"):
        initial_latents(pipe, 2, n)


@pytest.mark.parametrize("metric", ["E", "wen"])
def test_explicit_latents_and_generators_reproduce_seeded_scores(pipe, metric):
    det = make_detector(
        metric, pipe, num_inference_steps=3, **({"n": 2} if metric == "wen" else {})
    )
    n = det.generations
    by_seed = [r["score"] for r in det.score_batch(PROMPTS, SEEDS)]
    x, _ = initial_latents(pipe, len(PROMPTS), n, seeds=SEEDS)
    by_latents = [r["score"] for r in det.score_batch(PROMPTS, latents=x)]
    by_gens = [r["score"] for r in det.score_batch(PROMPTS, generator=generators(SEEDS, n))]
    np.testing.assert_allclose(by_latents, by_seed, rtol=1e-6)
    np.testing.assert_allclose(by_gens, by_seed, rtol=1e-6)
    other = [r["score"] for r in det.score_batch(PROMPTS, latents=torch.randn_like(x))]
    assert not np.allclose(other, by_seed)


def test_tiled_l2_by_hand():
    a = np.zeros((8, 8, 3))
    b = np.zeros((8, 8, 3))
    assert tiled_l2(a, b) == 0.0
    b[0:2, 0:2] = 1.0  # one tile of a 4x4 grid entirely different
    assert tiled_l2(a, b, tiles=4) == pytest.approx(1.0)
    b2 = np.full((8, 8, 3), 0.1)  # small change everywhere
    assert tiled_l2(a, b2, tiles=4) == pytest.approx(0.1)


def test_carlini_scores_identical_generations_highest(pipe, monkeypatch):
    det = CarliniDetector(pipe, n=3, num_inference_steps=2)
    same = np.zeros((2, 3, 8, 8, 3))
    same[1] = np.random.default_rng(0).random((3, 8, 8, 3))
    monkeypatch.setattr(det, "images", lambda prompts, seeds, **kw: same)
    s = [r["score"] for r in det.score_batch(["a", "b"], [0, 1])]
    assert s[0] == 0.0 and s[1] < s[0]


def test_token_view_kinds(pipe):
    rec = EntropyE(pipe, num_inference_steps=2).record(PROMPTS, SEEDS)
    view = token_view(rec, image=0, steps=0, layers=3)
    L = int(rec.lengths[0])
    assert [t["kind"] for t in view[: L + 1]] == ["bos"] + ["prompt"] * (L - 2) + ["eos", "summary"]
    assert view[5]["token"] == "cat" and len(view) == 77
    assert sum(t["attention"] for t in view) == pytest.approx(1.0, abs=1e-5)


def test_make_detector_errors(pipe):
    with pytest.raises(ValueError, match="unknown metric 'F'"):
        make_detector("F", pipe)
    with pytest.raises(ValueError, match="takes no option"):
        make_detector("E", pipe, n=4)
    with pytest.raises(ValueError, match="prompts but"):
        make_detector("E", pipe).score_batch(["a"], [1, 2])
    with pytest.raises(ValueError, match="guidance"):
        make_detector("wen", pipe, guidance_scale=1.0).score_batch(["a"], [1])
    with pytest.raises(ValueError, match="n >= 2"):
        make_detector("carlini", pipe, n=1).score_batch(["a"], [1])
