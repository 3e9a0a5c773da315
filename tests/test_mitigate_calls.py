"""The mitigators acting on whole UNet calls (Jain et al.'s guidance delay, Wen et al.'s prompt
optimisation) against hand-written denoising loops and optimisers on a tiny pipeline."""

from __future__ import annotations

import pytest
import torch

import attnmem.mitigate as mitigate
from attnmem.detect import generators, initial_latents
from attnmem.mitigate import GuidanceDelay, Mitigation, PromptOptimization
from attnmem.testing import tiny_sd1_pipeline

PROMPTS = ["a photo of a cat", "a dog on the beach at sunset"]
SEEDS = [3, 4]
STEPS = 12
G = 7.5


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


def embeds(pipe, n):
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", n, True, negative_prompt=[""] * 2)
    return cond, uncond


def run_pipe(pipe, n=1, **kw):
    return pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=G,
        num_images_per_prompt=n,
        generator=generators(SEEDS, n),
        output_type="latent",
        **kw,
    ).images


@torch.no_grad()
def manual_loop(pipe, n, rule, unet=None):
    """DDIM by hand; ``rule(k, t, u, c, state) -> per-row guidance`` (rows, )."""
    unet = unet or pipe.unet
    cond, uncond = embeds(pipe, n)
    x, _ = initial_latents(pipe, 2, n, seeds=SEEDS)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    state: dict = {}
    for k, t in enumerate(sched.timesteps):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]))
        u, c = out.sample.chunk(2)
        g = rule(k, int(t), u, c, state).view(-1, 1, 1, 1)
        x = sched.step(u + g * (c - u), t, x).prev_sample
    return x, state


def test_static_delay_matches_a_hand_written_loop(pipe):
    tau = 500
    with mitigate.apply(pipe, GuidanceDelay(mode="static", transition=tau)) as h:
        got = run_pipe(pipe, n=2)
    ref, _ = manual_loop(pipe, 2, lambda k, t, u, c, s: torch.full((4,), G if t <= tau else 0.0))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    pipe.scheduler.set_timesteps(STEPS)
    first = [k for k, t in enumerate(pipe.scheduler.timesteps.tolist()) if t <= tau][0]
    assert h.calls[0]["transition_step"] == [first] * 4
    assert "encode_prompt" not in vars(pipe)  # removed
    torch.testing.assert_close(run_pipe(pipe, n=2), run_pipe(pipe, n=2))  # plain again


def test_dynamic_delay_matches_a_hand_written_loop(pipe):
    # ||eps_c - eps_u|| of a random-weight UNet has no local minimum: a forward hook registered
    # before the mitigator scales each row's guidance vector by 1 + 0.3 |k - m_r|, a dip at
    # step m_r (row 2: a growing factor). The hand-written loop sees the same outputs.
    dips = torch.tensor([4.0, 6.0, -1.0, 3.0])
    calls = {"k": 0}

    def bump(module, args, output):
        k = calls["k"]
        calls["k"] += 1
        u, c = output[0].chunk(2)
        f = (1 + 0.3 * (k - dips).abs()).view(-1, 1, 1, 1)
        return (torch.cat([u, u + f * (c - u)]),)

    def rule(k, t, u, c, s):
        d = (c - u).flatten(1).norm(dim=1)
        hist = s.setdefault("d", [])
        on = s.setdefault("on", [False] * len(d))
        s.setdefault("at", [None] * len(d))
        for r in range(len(d)):
            if not on[r] and k >= 2 and d[r] > hist[-1][r] and hist[-2][r] > hist[-1][r]:
                on[r], s["at"][r] = True, k
        hist.append(d)
        return torch.tensor([G if o else 1.0 for o in on])

    def unet_tuple(x, t, encoder_hidden_states):
        return type(
            "Out",
            (),
            {
                "sample": pipe.unet(
                    x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False
                )[0]
            },
        )

    hook = pipe.unet.register_forward_hook(bump)
    try:
        with mitigate.apply(pipe, "cfg-delay:mode=dynamic") as h:
            got = run_pipe(pipe, n=2)
        calls["k"] = 0
        ref, state = manual_loop(pipe, 2, rule, unet=unet_tuple)
    finally:
        hook.remove()
    assert h.calls[0]["transition_step"] == state["at"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert state["at"][0] == 5 and state["at"][1] == 7 and state["at"][3] == 4


def test_delay_needs_guidance(pipe):
    with mitigate.apply(pipe, GuidanceDelay()), pytest.raises(ValueError, match="guidance"):
        pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, output_type="latent")


def test_prompt_optimization_matches_a_hand_written_optimiser(pipe):
    n = 2
    cond, uncond = embeds(pipe, n)
    x, _ = initial_latents(pipe, 2, n, seeds=SEEDS)
    pipe.scheduler.set_timesteps(STEPS)
    t0 = int(pipe.scheduler.timesteps[0])  # the first step's timestep
    with torch.no_grad():
        l0 = [
            float(
                (
                    pipe.unet(
                        x[p * n : (p + 1) * n], t0, encoder_hidden_states=cond[p * n : (p + 1) * n]
                    ).sample
                    - pipe.unet(x[p * n : (p + 1) * n], t0, encoder_hidden_states=uncond[:n]).sample
                ).norm()
            )
            for p in range(2)
        ]
    target = 0.97 * min(l0)  # a few updates, not none
    m = PromptOptimization(target=target, iterations=4)

    opt_embeds, iters = [], []
    for p in range(2):
        e = cond[p * n : p * n + 1].detach().clone().requires_grad_(True)
        opt = torch.optim.AdamW([e], lr=0.05, weight_decay=0.01)
        xs = x[p * n : (p + 1) * n]
        k = 0
        for _ in range(4):
            k += 1
            eps_c = pipe.unet(xs, t0, encoder_hidden_states=e.expand(n, -1, -1)).sample
            with torch.no_grad():
                eps_u = pipe.unet(xs, t0, encoder_hidden_states=uncond[:n]).sample
            loss = (eps_c - eps_u).norm()
            if loss.item() <= target:
                break
            opt.zero_grad()
            loss.backward()
            e.grad[:, 0] = 0
            opt.step()
        opt_embeds.append(e.detach().expand(n, -1, -1))
        iters.append(k)
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=torch.cat(opt_embeds),
            negative_prompt_embeds=uncond,
            latents=x,
            num_inference_steps=STEPS,
            guidance_scale=G,
            output_type="latent",
        ).images

    with mitigate.apply(pipe, m) as h:
        got = run_pipe(pipe, n=n)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)  # batched vs one prompt
    rep = h.calls[0]["prompts"]
    assert [r["iterations"] for r in rep] == iters
    assert all(r["updates"] >= 1 for r in rep)
    assert all(r["backwards"] == n * r["updates"] for r in rep)


def test_parse_specs():
    assert mitigate.parse("attention:bos_scale=1.5,mask=padding+eos") == Mitigation(
        bos_scale=1.5, mask="padding+eos"
    )
    assert mitigate.parse("cfg-delay:mode=static,transition=600") == GuidanceDelay(
        mode="static", transition=600
    )
    assert mitigate.parse({"name": "prompt-opt", "target": 2}) == PromptOptimization(target=2)
    with pytest.raises(ValueError, match="unknown mitigation 'x'"):
        mitigate.parse("x")
    with pytest.raises(ValueError, match="it takes"):
        mitigate.parse("cfg-delay:nope=1")
