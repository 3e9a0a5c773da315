"""Fine-tuning with attnmem's entropy filter, in the shape of diffusers' train_text_to_image.py.

The filter reads the cross-attention entropy recorded during the training forward (no extra
UNet pass) and zero-weights samples whose entropy is an outlier for their noise level.

    python examples/train_entropy_filter.py --steps 20 --filter entropy
    torchrun --nproc-per-node 2 examples/train_entropy_filter.py --steps 20   # data parallel

It runs on attnmem's tiny random-weight SD1 pipeline and synthetic data so it works offline;
swap in your pipeline and dataset.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import attnmem
from attnmem.testing import tiny_sd1_pipeline
from attnmem.train import Absolute, RunningQuantile, RunningZScore, WenFilter


def synthetic_batch(step: int, batch: int, tokenizer, seed: int = 0):
    """Images in [-1, 1] and captions; a few captions repeat (duplicated training data)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    images = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    words = ["red", "blue", "green", "circle", "square", "sky", "forest", "cat", "dog", "house"]
    caps = []
    for _ in range(batch):
        idx = torch.randint(len(words), (4,), generator=g).tolist()
        caps.append("a photo of " + " ".join(words[j] for j in idx))
    ids = tokenizer(
        caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return images, ids


def make_threshold(name: str):
    if name == "zscore":
        return RunningZScore(z=3.0, buckets=10, min_count=64)
    if name == "quantile":
        return RunningQuantile(q=0.5, buckets=2, min_count=4)
    if name == "median":  # one bucket: drops about half of every batch after the first
        return RunningQuantile(q=0.5, buckets=1, min_count=4)
    return Absolute(tau=float(name))


def train(
    steps: int = 10,
    batch: int = 8,
    filter: str = "entropy",
    threshold: str = "zscore",
    lr: float = 1e-4,
    seed: int = 0,
):
    """Train the tiny UNet; returns (unet, per-step fraction dropped). Under torchrun each rank
    takes its slice of every global batch and DDP averages gradients."""
    import torch.distributed as dist

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if batch % world:
        raise ValueError(f"global batch {batch} must divide by the number of processes {world}")
    local = batch // world

    pipe = tiny_sd1_pipeline(seed=seed)
    unet, vae, text_encoder, sched = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    filt = None
    if filter == "entropy":
        filt = attnmem.EntropyFilter(unet, threshold=make_threshold(threshold))
    elif filter == "wen":
        filt = WenFilter(unet, threshold=make_threshold(threshold))
    model = torch.nn.parallel.DistributedDataParallel(unet) if distributed else unet
    opt = torch.optim.SGD(unet.parameters(), lr=lr)
    with torch.no_grad():
        empty = text_encoder(
            pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        )[0]
    dropped = []
    for step in range(steps):
        images, ids = synthetic_batch(step, batch, pipe.tokenizer, seed)
        g = torch.Generator().manual_seed(seed * 7919 + step)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
            emb = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        sl = slice(rank * local, (rank + 1) * local)  # this rank's part of the global batch
        pred = model(noisy[sl], t[sl], encoder_hidden_states=emb[sl]).sample
        per_sample = F.mse_loss(pred.float(), noise[sl].float(), reduction="none").mean(
            dim=(1, 2, 3)
        )
        if filter == "entropy":
            w = filt.weights(t[sl])
        elif filter == "wen":
            w = filt.weights(noisy[sl], t[sl], pred, empty)
        else:
            w = torch.ones_like(per_sample)
        loss = (w * per_sample).mean()  # zero weights, mean over the whole local batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dropped.append(filt.fraction_dropped if filt is not None else 0.0)
    if filt is not None:
        filt.remove()
    return unet, dropped


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--filter", choices=["none", "entropy", "wen"], default="entropy")
    ap.add_argument(
        "--threshold", default="zscore", help="zscore | quantile | median | a number (absolute tau)"
    )
    args = ap.parse_args()
    _, dropped = train(args.steps, args.batch, args.filter, args.threshold)
    print(f"fraction dropped per step: {[round(d, 3) for d in dropped]}")


if __name__ == "__main__":
    main()
