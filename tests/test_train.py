"""Training-time mitigation: filter weights, thresholds, gradients through attnmem's op, the
data-parallel invariant, and the example script."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnmem
from attnmem.testing import describe, tiny_sd1_pipeline
from attnmem.train import Absolute, RunningQuantile, RunningZScore, WenFilter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_entropy_filter.py"


def example_train():
    """``train`` of the example script (a script, not a module: loaded from its path)."""
    return runpy.run_path(str(EXAMPLE))["train"]


def batch(unet, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(B, c.in_channels, c.sample_size, c.sample_size, generator=g)
    e = torch.randn(B, 77, c.cross_attention_dim, generator=g)
    t = torch.tensor([10, 300, 600, 990])[:B]
    return x, t, e


def test_entropy_matches_explicit_softmax_per_sample():
    unet = tiny_sd1_pipeline().unet
    layer = describe(unet)[3].name
    attn = dict(unet.named_modules())[layer]
    seen = {}
    hooks = [
        attn.to_q.register_forward_hook(lambda m, i, o: seen.setdefault("q", o.detach())),
        attn.to_k.register_forward_hook(lambda m, i, o: seen.setdefault("k", o.detach())),
    ]
    x, t, e = batch(unet)
    with attnmem.EntropyFilter(unet, threshold=Absolute(tau=math.inf)) as filt:
        unet(x, t, encoder_hidden_states=e)
        got = filt.entropy()
        w = filt.weights(t)
    for h in hooks:
        h.remove()
    B, H = x.shape[0], attn.heads
    q, k = seen["q"], seen["k"]
    D = q.shape[-1] // H
    p = torch.softmax(
        q.view(B, -1, H, D).transpose(1, 2)
        @ k.view(B, -1, H, D).transpose(1, 2).transpose(-1, -2)
        * attn.scale,
        -1,
    )
    abar = p.mean(dim=(1, 2))
    torch.testing.assert_close(got, -(abar * abar.log()).sum(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(w, torch.ones(B))


def test_absolute_threshold_drops_above_tau_without_extra_pass():
    unet = tiny_sd1_pipeline().unet
    x, t, e = batch(unet)
    calls = []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    with attnmem.EntropyFilter(unet, threshold=Absolute(tau=0.0)) as filt:
        unet(x, t, encoder_hidden_states=e)
        values = filt.entropy()
        tau = float(values.median())
        filt.threshold = Absolute(tau=tau)
        w = filt.weights(t)
    hook.remove()
    assert calls == [1]  # the training forward only
    assert torch.equal(w, (values <= tau).float())
    assert filt.fraction_dropped == pytest.approx(float((values > tau).float().mean()))
    assert len(filt.handle.records) == 1  # records do not pile up over steps


def test_running_quantile_by_hand():
    th = RunningQuantile(q=0.5, buckets=2, num_train_timesteps=1000, min_count=3, window=4)
    t_low = torch.tensor([100, 200, 300])
    # warm-up: nothing dropped until a bucket has min_count values
    assert not th.drop(torch.tensor([9.0, 9.0, 9.0]), t_low).any()
    th.update(torch.tensor([1.0, 2.0, 3.0]), t_low)
    # bucket 0 median of [1, 2, 3] = 2; bucket 1 still empty
    d = th.drop(torch.tensor([1.5, 2.5, 9.0]), torch.tensor([100, 100, 900]))
    assert d.tolist() == [False, True, False]
    th.update(torch.tensor([4.0, 5.0]), torch.tensor([0, 499]))  # window 4 keeps [2, 3, 4, 5]
    assert th.history[0] == [2.0, 3.0, 4.0, 5.0]
    assert th.drop(torch.tensor([3.4, 3.6]), torch.tensor([1, 2])).tolist() == [False, True]


def test_running_zscore_by_hand():
    th = RunningZScore(z=1.0, buckets=1, min_count=4)
    th.update(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4))
    mean, std = 2.5, torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()
    vals = torch.tensor([mean + std - 1e-3, mean + std + 1e-3])
    assert th.drop(vals, torch.zeros(2)).tolist() == [False, True]


def test_threshold_argument_errors():
    with pytest.raises(ValueError, match="min_count"):
        RunningQuantile(min_count=10, window=5)


def test_wen_filter_one_extra_forward_and_values():
    unet = tiny_sd1_pipeline().unet
    x, t, e = batch(unet)
    empty = torch.zeros(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=e).sample
        eps_u = unet(x, t, encoder_hidden_states=empty.expand(4, -1, -1)).sample
    expected = (eps_c - eps_u).flatten(1).norm(dim=1)
    calls = []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    wen = WenFilter(unet, threshold=Absolute(tau=float(expected.median())))
    w = wen.weights(x, t, eps_c, empty)
    hook.remove()
    assert calls == [1]
    torch.testing.assert_close(wen.last.values, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(w, (expected <= expected.median()).float())


def test_training_step_matches_plain_sdpa_float32():
    """One SGD step through attnmem's op (its autograd) equals one through diffusers' SDPA."""
    params = []
    for use_attnmem in (False, True):
        unet = tiny_sd1_pipeline().unet.train()
        x, t, e = batch(unet)
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        filt = (
            attnmem.EntropyFilter(unet, threshold=Absolute(tau=math.inf)) if use_attnmem else None
        )
        pred = unet(x, t, encoder_hidden_states=e).sample
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        w = filt.weights(t) if filt else torch.ones(4)
        opt = torch.optim.SGD(unet.parameters(), lr=1.0)
        (w * per).mean().backward()
        opt.step()
        if filt:
            filt.remove()
        params.append({n: p.detach().clone() for n, p in unet.named_parameters()})
    cross = [n for n in params[0] if "attn2.to_q" in n or "attn2.to_k" in n]
    assert cross
    for n in params[0]:
        torch.testing.assert_close(params[1][n], params[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_example_script_runs_and_drops():
    train = example_train()
    _, dropped = train(steps=5, batch=8, filter="entropy", threshold="quantile")
    assert dropped[0] == 0.0 and max(dropped) > 0.0
    _, dropped = train(steps=3, batch=8, filter="wen", threshold="quantile")
    assert len(dropped) == 3


DDP_SCRIPT = """
import runpy, torch
train = runpy.run_path({example!r})["train"]
import torch.distributed as dist
unet, dropped = train(steps=4, batch=8, filter="entropy", threshold="median", lr=0.02)
if dist.get_rank() == 0:
    torch.save({{"state": unet.state_dict(), "dropped": dropped}}, {out!r})
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_data_parallel_equals_single_process(tmp_path):
    """2 CPU processes over gloo (DDP, each half of the global batch) reach the same weights
    as one process with the whole global batch: zero weights and shared thresholds."""
    train = example_train()
    out = tmp_path / "ddp.pt"
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(example=str(EXAMPLE), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29531",
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out)
    unet, dropped = train(steps=4, batch=8, filter="entropy", threshold="median", lr=0.02)
    assert dropped[0] == 0 and min(dropped[1:]) > 0  # the filter really dropped samples
    for n, p in unet.state_dict().items():
        torch.testing.assert_close(ddp["state"][n], p, atol=1e-5, rtol=1e-4, msg=n)
