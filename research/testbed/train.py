"""Train the attnmem testbed: a small text-to-image diffusion model that really memorizes.

    python -m research.testbed.train --out attnmem/data/testbed --workdir runs/testbed          # CPU
    python -m research.testbed.train --out ... --workdir ... --device cuda --preset gpu          # lent GPU

What it builds (all standard diffusers / transformers classes, so the folder loads with
``DiffusionPipeline.from_pretrained(folder, use_safetensors=True)``):

- **UNet2DConditionModel** on 32x32x3 "latents" = pixels: channels (32, 64, 64), resnets per
  level (1, 2, 2), cross-attention at 16x16 and 8x8 (11 ``attn2`` layers, 1/2/2 heads of dim
  32; the 4th in execution order, attnmem's default metric-E layer, is
  ``down_blocks.2.attentions.1``).
- **CLIPTextModel**, causal, hidden 32, 3 layers, 4 heads, random and **frozen** (as SD's
  CLIP is frozen), with a CLIP-like "massive activation" on the beginning token (BOS
  embedding = a spike on one hidden dimension that no other token, position or layer writes
  into, and that dimension's final-LayerNorm gain x4), so that BOS's output is one constant
  vector, nearly orthogonal to every other token's.
- a **beginning-token sink** in every ``attn2``: seeded at initialisation
  (:func:`seed_bos_sink`, +6 on the BOS logit of every query) and held during training
  (:class:`HeldSink`; ``--bos-sink seeded`` leaves it to training, which removes it).
- the real CLIP BPE tokenizer (:func:`attnmem.tokenizer.clip_tokenizer`, padding with EOS);
- **AutoencoderKL** set by hand to a fixed near-identity map between 32x32x3 images in [-1, 1]
  and 32x32x3 latents (one level, no down/up-sampling, no attention, every ResNet's last conv
  zeroed so it passes its input through; the GroupNorm + SiLU of the stem and head are made
  linear by pairing each signal channel z with -z and two constants +-S, S = 1000, so the
  group mean is exactly 0 and its variance ~S^2/2, then shifting into SiLU's linear range).
  Max error ~1e-5. ``scaling_factor`` 1: the UNet is trained on pixels, like a pixel-space
  model. :func:`identity_vae` documents the construction.
- DDIMScheduler with Stable Diffusion's schedule (scaled-linear betas 0.00085-0.012, 1000
  steps, epsilon prediction).

Training: epsilon-MSE with offset noise (std 0.1 per image and channel: in pixel space at
32x32, SD's schedule leaves enough signal at t = 999 for a model to read each image's mean
colour off the noisy input instead of the caption, and then generate random backgrounds from
pure noise; offset noise removes that shortcut), AdamW, batches from :func:`research.testbed.data.training_batch` (20 % memorized
items, 80 % fresh never-repeated negatives, 10 % captions dropped for classifier-free
guidance). Every batch is a pure function of (seed, step), so a run resumed from its
checkpoint continues the same stream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from attnmem.testing import SD_SCHEDULE as SCHEDULE
from attnmem.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, clip_tokenizer
from research.testbed import data

TEXT_HIDDEN = 32
SPIKE_DIM = 0  # hidden dimension of the BOS "massive activation"

PRESETS = {
    # 2 CPU cores: ~1-2 s per step of 32 depending on load.
    "cpu": dict(batch_size=32, lr=5e-4, warmup=100),
    # a lent GPU: bigger batch, same number of samples per memorized item per step ratio.
    "gpu": dict(batch_size=128, lr=1e-3, warmup=100),
}


def unet_config() -> dict:
    return dict(
        sample_size=data.SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=(1, 2, 2),
        attention_head_dim=(1, 2, 2),  # diffusers' legacy name: the number of heads
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=8,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    model = CLIPTextModel(config)
    with torch.no_grad():
        emb = model.embeddings.token_embedding.weight
        emb[:, SPIKE_DIM] = 0.0
        emb[BOS_ID] = 0.0
        emb[BOS_ID, SPIKE_DIM] = 10.0
        model.final_layer_norm.weight[SPIKE_DIM] = 4.0
        # the spike dimension belongs to BOS alone: no position and no layer writes into it,
        # so every other token's output is (nearly) orthogonal to BOS's (overlap ~ 0.1 of |h|)
        model.embeddings.position_embedding.weight[:, SPIKE_DIM] = 0.0
        for layer in model.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight[SPIKE_DIM] = 0.0
                lin.bias[SPIKE_DIM] = 0.0
    return model


def identity_vae(S: float = 1000.0, shift: float = 30.0):
    """AutoencoderKL whose encode (mean) and decode are the identity on 3-channel images.

    Width 12 = 3 groups of 4 channels {z, -z, S, -S}: GroupNorm sees mean 0 and variance
    (E[z^2] + S^2)/2, so it outputs z / (S/sqrt 2) (relative error E[z^2]/(2 S^2) < 1e-6); its
    gain S/sqrt 2 undoes that and its bias ``shift`` puts SiLU in its linear range
    (SiLU(x + 30) = x + 30 up to 1e-11); the output conv subtracts the shift. ResNets pass
    their input through (last conv zero). The encoder's log-variance is -30 (std 3e-7).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(12,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=3,
        sample_size=data.SIZE,
        scaling_factor=1.0,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):  # keep ResNet norms well defined
                m.weight.fill_(1.0)
        for m in vae.modules():
            if m.__class__.__name__ == "ResnetBlock2D":
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()

        def stem(conv):  # 3 -> 12: channel 4g = z_g, 4g+1 = -z_g, 4g+2 = S, 4g+3 = -S
            for g in range(3):
                conv.weight[4 * g, g, 1, 1] = 1.0
                conv.weight[4 * g + 1, g, 1, 1] = -1.0
                conv.bias[4 * g + 2] = S
                conv.bias[4 * g + 3] = -S

        def head(norm, conv, out_channels, offset=0):
            norm.weight.fill_(S / math.sqrt(2))
            norm.bias.fill_(shift)
            for g in range(3):
                conv.weight[offset + g, 4 * g, 1, 1] = 1.0
                conv.bias[offset + g] = -shift

        stem(vae.encoder.conv_in)
        head(vae.encoder.conv_norm_out, vae.encoder.conv_out, 6)
        vae.encoder.conv_out.bias[3:6] = -30.0  # log-variance
        stem(vae.decoder.conv_in)
        head(vae.decoder.conv_norm_out, vae.decoder.conv_out, 3)
        for q in (vae.quant_conv, vae.post_quant_conv):
            if q is not None:
                q.weight.zero_()
                q.bias.zero_()
                for c in range(q.weight.shape[0]):
                    q.weight[c, c, 0, 0] = 1.0
    return vae.eval()


def seed_bos_sink(unet, text_encoder, logit: float = 6.0) -> None:
    """Initialise every cross-attention so that the beginning token starts as its sink.

    Stable Diffusion inherits its BOS sink from pretrained CLIP (BOS output of huge norm that
    every query matches); a model trained from scratch in ~1 CPU-hour does not grow one (a
    first try of this script stayed at near-uniform attention, entropy ~ln 77, after 400
    steps). So it is seeded, and training then decides what to do with it: each
    transformer block's ``norm2`` (the LayerNorm before ``attn2``) gets bias 1, which gives
    every query the same component q0 = W_q 1, and ``to_k`` gets the rank-one term
    k += kappa_h q0_h (h_BOS . h) / |h_BOS|^2 per head h, which adds ``logit`` to the BOS score of
    every query at initialisation (first-step BOS mass 0.4-0.9 with logit 6, by layer) and next to nothing for other
    tokens, whose output barely overlaps h_BOS (see :func:`build_text_encoder`).
    """
    from diffusers.models.attention import BasicTransformerBlock

    with torch.no_grad():
        h_bos = _bos_hidden(text_encoder)
        for block in unet.modules():
            if not isinstance(block, BasicTransformerBlock) or block.attn2 is None:
                continue
            attn = block.attn2
            block.norm2.bias.fill_(1.0)
            q0 = attn.to_q.weight @ block.norm2.bias
            heads, inner = attn.heads, q0.numel()
            d = inner // heads
            for h in range(heads):
                q0h = q0[h * d : (h + 1) * d]
                kappa = logit * math.sqrt(d) / float(q0h @ q0h)
                attn.to_k.weight[h * d : (h + 1) * d] += (
                    kappa * torch.outer(q0h, h_bos) / float(h_bos @ h_bos)
                )


def _bos_hidden(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([[BOS_ID] + [EOS_ID] * (CONTEXT_LENGTH - 1)])
        return text_encoder(ids).last_hidden_state[0, 0].float()


class HeldSink:
    """Holds the seeded beginning-token sink of every ``attn2`` fixed during training.

    Stable Diffusion trains its UNet against a frozen, pretrained CLIP whose BOS output is a
    "massive activation" every query matches; the testbed cannot pretrain one, and a seeded
    sink that training may change erodes within ~1000 steps (padding tokens take its place).
    So the sink is part of the architecture, as it is for SD's UNet: with the text encoder
    frozen, BOS's output h_bos is a constant, and after every optimizer step this projects

    - ``to_k`` back onto W_k u = k0 (u = h_bos / |h_bos|): the BOS key stays what
      :func:`seed_bos_sink` made it, every other direction of W_k trains freely;
    - each head's ``to_q`` back onto k̂_h^T W_q,h = r0_h (k̂_h = the unit BOS key of head h):
      the queries' component along the BOS key is a fixed function of the ``norm2`` output;
    - and ``norm2`` (the LayerNorm before ``attn2``, whose bias 1 gives every query the shared
      component behind the BOS logit) is frozen.

    Everything else learns, so any token can still outbid BOS for any query: a memorized
    caption can pull attention off the sink, which is what the testbed measures. With AdamW's
    element-wise steps a gradient projection would not keep the constraint; projecting the
    weights after the step does (exactly, up to rounding).
    """

    def __init__(self, unet, text_encoder) -> None:
        from diffusers.models.attention import BasicTransformerBlock

        h = _bos_hidden(text_encoder)
        u = h / h.norm()
        self.items = []
        with torch.no_grad():
            for block in unet.modules():
                if not isinstance(block, BasicTransformerBlock) or block.attn2 is None:
                    continue
                block.norm2.requires_grad_(False)
                attn = block.attn2
                wk, wq = attn.to_k.weight, attn.to_q.weight
                k0 = (wk @ u).clone()
                d = wq.shape[0] // attn.heads
                khat = torch.stack(
                    [
                        k0[i * d : (i + 1) * d] / k0[i * d : (i + 1) * d].norm()
                        for i in range(attn.heads)
                    ]
                )
                r0 = torch.stack(
                    [khat[i] @ wq[i * d : (i + 1) * d] for i in range(attn.heads)]
                ).clone()
                self.items.append((attn, u.clone(), k0, khat, r0, d))

    @torch.no_grad()
    def apply(self) -> None:
        for attn, u, k0, khat, r0, d in self.items:
            wk, wq = attn.to_k.weight, attn.to_q.weight
            wk -= torch.outer(wk @ u - k0, u)
            for i in range(attn.heads):
                rows = wq[i * d : (i + 1) * d]
                rows -= torch.outer(khat[i], khat[i] @ rows - r0[i])

    def to(self, device) -> HeldSink:
        self.items = [
            (a, u.to(device), k0.to(device), kh.to(device), r0.to(device), d)
            for a, u, k0, kh, r0, d in self.items
        ]
        return self


def alphas_cumprod() -> torch.Tensor:
    """The training noise schedule's cumulative alphas (SD's schedule, 1000 steps)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        prediction_type="epsilon",
        **{k: v for k, v in SCHEDULE.items() if k != "set_alpha_to_one"},
    )
    return sched.alphas_cumprod


def noised_batch(
    seed: int,
    step: int,
    batch_size: int,
    p_mem: float,
    p_drop: float,
    offset_noise: float,
    alphas: torch.Tensor,
):
    """Training batch ``step`` on the CPU: captions, x0, noise, timesteps t and the noised x_t.

    A pure function of its arguments (data, noise and t all come from (seed, step)), so a
    resumed or continued run sees exactly the batches an uninterrupted one would.
    """
    captions, images = data.training_batch(seed, step, batch_size, p_mem, p_drop)
    x0 = torch.from_numpy(images)
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(batch_size, 3, 1, 1, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return captions, x0, noise, t, xt


def build_pipeline(unet, text_encoder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=identity_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("sd1"),
        unet=unet,
        scheduler=DDIMScheduler(prediction_type="epsilon", **SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(losses)
    k = max(1, len(x) // 50)
    smooth = np.convolve(x, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(np.arange(len(x)), x, lw=0.3, alpha=0.4, label="per step")
    ax.plot(np.arange(len(smooth)) + k - 1, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("training step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def export(unet, text_encoder, out: Path, info: dict, losses: list[float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(unet.eval(), text_encoder.eval())
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers writes tokenizer.json indented (3.6 MB); the same JSON compact is 1.7 MB.
    tok = out / "tokenizer" / "tokenizer.json"
    if tok.exists():
        compact = json.dumps(
            json.loads(tok.read_text("utf-8")), ensure_ascii=False, separators=(",", ":")
        )
        tok.write_text(compact, "utf-8")
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    if losses:
        plot_losses(losses, out / "loss.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    ap.add_argument("--workdir", type=Path, required=True, help="checkpoint and log folder")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: the device's")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=data.SEED, help="dataset and weight seed")
    ap.add_argument("--p-mem", type=float, default=0.2, help="share of memorized samples")
    ap.add_argument("--p-drop", type=float, default=0.1, help="share of dropped captions (CFG)")
    ap.add_argument(
        "--offset-noise",
        type=float,
        default=0.1,
        help="std of a per-image, per-channel constant added to the noise (see the docstring)",
    )
    ap.add_argument(
        "--offset-noise-start", type=int, default=0, help="first step that uses offset noise"
    )
    ap.add_argument(
        "--text-encoder",
        default="frozen",
        choices=["frozen", "joint"],
        help="frozen (as in Stable Diffusion, where CLIP is not trained) or trained jointly",
    )
    ap.add_argument(
        "--bos-sink",
        default="held",
        choices=["held", "seeded"],
        help="held: the seeded BOS sink is kept fixed during training (HeldSink); "
        "seeded: seeded at initialisation, then left to training",
    )
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    preset = dict(PRESETS[args.preset or args.device])
    bs = args.batch_size or preset["batch_size"]
    lr = args.lr or preset["lr"]
    warmup = preset["warmup"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.device == "cuda"

    from tqdm import tqdm

    torch.manual_seed(args.seed)
    unet = build_unet()
    text_encoder = build_text_encoder()
    seed_bos_sink(unet, text_encoder)
    if args.bos_sink == "held" and args.text_encoder != "frozen":
        ap.error("--bos-sink held needs --text-encoder frozen (the BOS output must be constant)")
    held = HeldSink(unet, text_encoder) if args.bos_sink == "held" else None
    joint = args.text_encoder == "joint"
    unet, text_encoder = unet.to(device).train(), text_encoder.to(device).train(joint)
    if held is not None:
        held.to(device)
    text_encoder.requires_grad_(joint)
    tokenizer = clip_tokenizer("sd1")
    alphas = alphas_cumprod()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if joint else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "checkpoint.pt"
    start, losses = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])
        print(f"resumed from {ckpt} at step {start}", flush=True)

    def save(step: int) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "losses": losses,
                "rng": torch.get_rng_state(),
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, smoothing=0.05)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        offset = args.offset_noise if step >= args.offset_noise_start else 0.0
        captions, x0, noise, t, xt = noised_batch(
            args.seed, step, bs, args.p_mem, args.p_drop, offset, alphas
        )
        noise, t, xt = noise.to(device), t.to(device), xt.to(device)
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=CONTEXT_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            with torch.set_grad_enabled(joint):
                cond = text_encoder(ids).last_hidden_state
            pred = unet(xt, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if held is not None:
            held.apply()
        losses.append(float(loss))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save(step + 1)
    bar.close()

    seen, with_caption = data.exposures(args.seed, args.steps, bs, args.p_mem, args.p_drop)
    info = {
        "steps": args.steps,
        "batch_size": bs,
        "lr": lr,
        "warmup": warmup,
        "seed": args.seed,
        "p_mem": args.p_mem,
        "p_drop": args.p_drop,
        "offset_noise": args.offset_noise,
        "offset_noise_start": args.offset_noise_start,
        "text_encoder": args.text_encoder,
        "bos_sink": args.bos_sink,
        "device": args.device,
        "samples": args.steps * bs,
        "wall_s_this_run": round(time.time() - t0, 1),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "memorized_exposures": seen.tolist(),
        "memorized_exposures_with_caption": with_caption.tolist(),
        "torch": torch.__version__,
    }
    export(unet.float().cpu(), text_encoder.float().cpu(), args.out, info, losses)
    print(json.dumps({k: v for k, v in info.items() if "exposures" not in k}), flush=True)


if __name__ == "__main__":
    main()
