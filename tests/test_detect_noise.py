"""The detectors that call the UNet directly (anisotropy, sharpness, nemo) against independent
computations on the tiny pipelines: UNet inputs and embeddings captured from the pipeline's own
first CFG call, outputs recomputed by hand; finite differences for the JVP; a loop-based MS-SSIM."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from attnmem.detect import (
    AnisotropyDetector,
    NemoDetector,
    SharpnessDetector,
    generators,
    initial_latents,
    make_detector,
    ms_ssim,
)
from attnmem.testing import tiny_sd1_pipeline, tiny_sd2_pipeline

PROMPTS = ["a photo of a cat", "a dog on the beach at sunset"]
SEEDS = [3, 4]


class _Stop(Exception):
    pass


def first_call(pipe, prompts, seeds, n, guidance=7.5, **kw):
    """(sample, encoder_hidden_states) of the pipeline's first UNet call (50 DDIM steps)."""
    got = {}

    def hook(module, args, kwargs):
        got["x"] = (args[0] if args else kwargs["sample"]).detach().clone()
        got["t"] = int(args[1] if len(args) > 1 else kwargs["timestep"])
        got["ehs"] = kwargs["encoder_hidden_states"].detach().clone()
        raise _Stop

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(
            list(prompts),
            num_inference_steps=50,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            generator=generators(seeds, n),
            output_type="latent",
            **kw,
        )
    except _Stop:
        pass
    finally:
        h.remove()
    return got


def eps_of(pipe, x, t, ehs):
    """Noise prediction in float64, converting a v-prediction by hand."""
    with torch.no_grad():
        out = pipe.unet(x, t, encoder_hidden_states=ehs).sample.double()
    if pipe.scheduler.config.prediction_type == "v_prediction":
        a = float(pipe.scheduler.alphas_cumprod[t])
        out = a**0.5 * out + (1 - a) ** 0.5 * x.double()
    return out


@pytest.mark.parametrize("make", [tiny_sd1_pipeline, tiny_sd2_pipeline], ids=["sd1", "sd2"])
def test_anisotropy_matches_hooked_unet_outputs(make):
    pipe = make()
    n = 2
    det = AnisotropyDetector(pipe, n=n, gamma_norm=1.0, gamma_cos=2.0)
    assert det.settings()["t_high"] == 981 and det.settings()["t_low"] == 41
    res = det.score_batch(PROMPTS, SEEDS)
    got = first_call(pipe, PROMPTS, SEEDS, n)
    assert got["t"] == 981
    x, ehs = got["x"], got["ehs"]  # [x; x], [uncond; cond]
    u, c = eps_of(pipe, x, 981, ehs).chunk(2)
    norm = (c - u).flatten(1).norm(dim=1)
    u, c = eps_of(pipe, x, 41, ehs).chunk(2)
    d = c - u
    cos = (u * d).sum(1) / (u.norm(dim=1) * d.norm(dim=1))  # per pixel, over channels
    cos = cos.flatten(1).mean(1)
    N = norm.view(2, n).mean(1)
    C = cos.view(2, n).mean(1)
    np.testing.assert_allclose([r["components"]["norm"] for r in res], N, rtol=1e-5)
    np.testing.assert_allclose([r["components"]["cosine"] for r in res], C, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([r["score"] for r in res], N + 2 * C, rtol=1e-5)
    assert res[0]["forwards"] == 4 * n and res[0]["backwards"] == 0


def test_anisotropy_norm_term_is_wen_first_step():
    pipe = tiny_sd1_pipeline()
    a = AnisotropyDetector(pipe, n=2).score_batch(PROMPTS, SEEDS)
    w = make_detector("wen", pipe, n=2).score_batch(PROMPTS, SEEDS)
    np.testing.assert_allclose(
        [r["components"]["norm"] for r in a], [r["score"] for r in w], rtol=1e-5
    )


def test_sharpness_jvp_matches_finite_differences():
    pipe = tiny_sd1_pipeline().to(torch.float64)
    n = 2
    det = SharpnessDetector(pipe, n=n)
    assert det.settings()["t"] == 981
    got = det.values(PROMPTS, SEEDS)
    ref = first_call(pipe, PROMPTS, SEEDS, n)
    x2, ehs, t = ref["x"], ref["ehs"], ref["t"]
    x = x2[: len(x2) // 2]
    sigma = (1 - float(pipe.scheduler.alphas_cumprod[t])) ** 0.5

    def scores(z):
        return -eps_of(pipe, torch.cat([z, z]), t, ehs) / sigma

    s_u, s_c = scores(x).chunk(2)
    ds = s_c - s_u
    h = 1e-4 / float(ds.abs().max())
    jv = (scores(x + h * ds) - scores(x - h * ds)) / (2 * h)
    jv_u, jv_c = jv.chunk(2)
    expected = (jv_c - jv_u).flatten(1).norm(dim=1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-8)
    res = det.score_batch(PROMPTS, SEEDS)
    np.testing.assert_allclose([r["score"] for r in res], expected.view(2, n).mean(1), rtol=1e-5)
    assert res[0]["forwards"] == 2 * n and res[0]["jvps"] == 2 * n


def test_sharpness_in_chunks_of_generations_equals_one_jvp():
    pipe = tiny_sd1_pipeline().to(torch.float64)
    whole = SharpnessDetector(pipe, n=3, jvp_generations=None).values(PROMPTS, SEEDS)
    for k in (1, 2, 4):
        got = SharpnessDetector(pipe, n=3, jvp_generations=k).values(PROMPTS, SEEDS)
        torch.testing.assert_close(got, whole, rtol=1e-9, atol=1e-12)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jvp_generations"):
            SharpnessDetector(pipe, jvp_generations=bad)


def test_sharpness_fp32_close_to_fp64():
    p32 = tiny_sd1_pipeline()
    p64 = tiny_sd1_pipeline().to(torch.float64)
    x, _ = initial_latents(p32, 2, 1, seeds=SEEDS)  # fp64 draws would be other numbers
    a = SharpnessDetector(p32).values(PROMPTS, latents=x)
    b = SharpnessDetector(p64).values(PROMPTS, latents=x)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# MS-SSIM and nemo
# ----------------------------------------------------------------------------------------------
def _window():
    d = np.arange(-5, 6, dtype=float)
    g = np.exp(-((d / 1.5) ** 2) / 2)
    g /= g.sum()
    return np.outer(g, g)


def _pool(x):
    H, W = x.shape[-2] // 2, x.shape[-1] // 2
    return x[..., : 2 * H, : 2 * W].reshape(*x.shape[:-2], H, 2, W, 2).mean(axis=(-3, -1))


def ref_pairwise_ms_ssim(D: np.ndarray, scales: int) -> np.ndarray:
    """MS-SSIM of every pair i < j of D (n, C, H, W), written out pixel window by pixel window:
    windowed moments only where the 11 x 11 window lies inside the image (what remains after
    the 5-pixel crop), dynamic range per scale from the first / second members of all pairs."""
    n = len(D)
    g = _window()
    pyramid = [D]
    for _ in range(scales - 1):
        pyramid.append(_pool(pyramid[-1]))
    pairs = list(itertools.combinations(range(n), 2))
    out = np.ones(len(pairs))
    for s, X in enumerate(pyramid):
        firsts = X[[i for i, _ in pairs]]
        seconds = X[[j for _, j in pairs]]
        R = max(np.ptp(firsts), np.ptp(seconds))
        c1, c2 = (0.01 * R) ** 2, (0.03 * R) ** 2
        H, W = X.shape[-2:]
        for k, (i, j) in enumerate(pairs):
            a, b = X[i], X[j]
            vals = []
            for y in range(5, H - 5):
                for x in range(5, W - 5):
                    wa, wb = a[:, y - 5 : y + 6, x - 5 : x + 6], b[:, y - 5 : y + 6, x - 5 : x + 6]
                    ma, mb = (wa * g).sum((1, 2)), (wb * g).sum((1, 2))
                    va = np.maximum((wa * wa * g).sum((1, 2)) - ma**2, 0)
                    vb = np.maximum((wb * wb * g).sum((1, 2)) - mb**2, 0)
                    cov = (wa * wb * g).sum((1, 2)) - ma * mb
                    cs = (2 * cov + c2) / (va + vb + c2)
                    if s == scales - 1:
                        cs = cs * (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
                    vals.append(cs)
            out[k] *= max(float(np.mean(vals)), 0.0) ** 0.33
    return out


def test_ms_ssim_matches_the_loop_reference():
    rng = np.random.default_rng(0)
    base = rng.random((1, 3, 44, 44))
    D = np.clip(base + 0.3 * rng.standard_normal((4, 3, 44, 44)), 0, 1)
    pairs = list(itertools.combinations(range(4), 2))
    t = torch.from_numpy(D)
    got = ms_ssim(t[[i for i, _ in pairs]], t[[j for _, j in pairs]], scales=3)
    np.testing.assert_allclose(got.numpy(), ref_pairwise_ms_ssim(D, 3), rtol=1e-10)
    same = ms_ssim(t, t, scales=3)
    np.testing.assert_allclose(same.numpy(), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="3 scales need images of at least 41"):
        ms_ssim(t[:, :, :40, :40], t[:, :, :40, :40], scales=3)


def test_nemo_matches_hooked_unet_outputs():
    pipe = tiny_sd1_pipeline()
    n, size = 4, 176  # VAE factor 4: 44 x 44 latents, the smallest that fit 3 scales
    det = NemoDetector(pipe, n=n, height=size, width=size)
    assert det.settings()["t"] == 961 and det.settings()["scales"] == 3
    res = det.score_batch(PROMPTS, SEEDS)
    got = first_call(pipe, PROMPTS, SEEDS, n, guidance=1.0, height=size, width=size)
    x, ehs = got["x"], got["ehs"]  # no CFG: conditional rows only
    D = (eps_of(pipe, x, 961, ehs) - x.double()).numpy()
    lo = D.min(axis=(-2, -1), keepdims=True)
    hi = D.max(axis=(-2, -1), keepdims=True)
    D = (D - lo) / (hi - lo)
    expected = [ref_pairwise_ms_ssim(D[p * n : (p + 1) * n], 3).max() for p in range(2)]
    np.testing.assert_allclose([r["score"] for r in res], expected, rtol=1e-6)
    assert res[0]["forwards"] == n


def test_nemo_small_latents_use_fewer_scales():
    pipe = tiny_sd1_pipeline()
    with pytest.warns(UserWarning, match="fit only 2 MS-SSIM scale"):
        assert NemoDetector(pipe, height=128, width=128).used_scales() == 2
    with pytest.raises(ValueError, match="too small for MS-SSIM"):
        NemoDetector(pipe).used_scales()  # 8 x 8 latents


def test_direct_detectors_refuse_sdxl():
    from attnmem.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    with pytest.raises(ValueError, match="anisotropy: calls the UNet directly"):
        AnisotropyDetector(pipe).score_batch(["a"], [0])
