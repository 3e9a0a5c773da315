"""Train the attnmem testbed: a small text-to-image diffusion model that really memorizes.

    # CPU, in resumable chunks (rerun with a larger --stop-at; the last chunk exports)
    python -m research.testbed.train --out attnmem/data/testbed --workdir runs/testbed --stop-at 2000
    python -m research.testbed.train --out ... --workdir ... --device cuda --preset gpu  # lent GPU
    python -m research.testbed.train --out DIR --workdir runs/testbed --export-snapshot 6000
    # a run whose checkpoint was lost: continue from an exported folder of the same run
    python -m research.testbed.train --out ... --workdir runs/cont --continue-from attnmem/data/testbed

What it builds (all standard diffusers / transformers classes, so the folder loads with
``DiffusionPipeline.from_pretrained(folder, use_safetensors=True)``):

- **UNet2DConditionModel** on 32x32x3 "latents" = pixels: channels (32, 64, 64), resnets per
  level (1, 2, 2), cross-attention at 16x16 and 8x8 (11 ``attn2`` layers, 1/2/2 heads of dim
  32; the 4th in execution order, attnmem's default metric-E layer, is
  ``down_blocks.2.attentions.1``).
- **CLIPTextModel**, causal, width 256, 2 layers, 4 heads, random and **frozen** (as SD's
  CLIP is frozen; 256 wide so that a linear read-out of its summary states can tell a
  memorized caption from a novel one, which 32 dimensions could not), with a CLIP-like
  "massive activation" on the beginning token (BOS embedding = a spike on one hidden dimension
  that no other token, position or layer writes into, and that dimension's final-LayerNorm
  gain x4), so that BOS's output is one constant vector, nearly orthogonal to every other
  token's. Its weights are exported in fp16 (its config says float32: it loads in fp32).
- a **constant beginning-token sink** in every ``attn2`` (:class:`ConstantSink`): the BOS
  logit is exactly ``SINK_LOGIT`` = 12 for every query, held through training, as Stable
  Diffusion's CLIP sink holds for a frozen encoder; everything else trains.
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
pure noise; offset noise removes that shortcut), AdamW (lr 5e-4, 100 warm-up steps, constant,
then a cosine to 0.1x over the last 30 % of the run), batches from
:func:`research.testbed.data.training_batch` (35 % memorized items, 65 % fresh never-repeated
negatives, 10 % captions dropped for classifier-free guidance). The exported weights are an
exponential moving average (decay 0.999, :class:`EMA`), not the last step's. Every batch is a
pure function of (seed, step), so a run resumed from its checkpoint continues the same stream;
``--snapshots`` keeps the EMA weights of earlier steps for validation.

``--continue-from FOLDER`` restarts a run from an exported folder of it (when its checkpoint is
gone): training resumes at the folder's step (its ``training.json``) on the same batches, but
from the exported EMA weights (as both the trained and the averaged weights) with fresh AdamW
moments, so it is a continuation, not the original run; ``training.json`` records it
(``continued_from``) and the loss curve starts at that step.
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

TEXT_HIDDEN = 256
TEXT_LAYERS = 2
TEXT_FFN = 512
SPIKE_DIM = 0  # hidden dimension of the BOS "massive activation"
SINK_LOGIT = 12.0  # the BOS logit of every query in every attn2 (nats)
SINK_CHANNELS = 2  # norm2 output channels held at exactly 1 (the last ones)
EMA_DECAY = 0.999

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
        intermediate_size=TEXT_FFN,
        num_hidden_layers=TEXT_LAYERS,
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


def _bos_hidden(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([[BOS_ID] + [EOS_ID] * (CONTEXT_LENGTH - 1)])
        ids = ids.to(text_encoder.device)
        return text_encoder(ids).last_hidden_state[0, 0].float()


def _cross_attention_blocks(unet):
    from diffusers.models.attention import BasicTransformerBlock

    return [
        b for b in unet.modules() if isinstance(b, BasicTransformerBlock) and b.attn2 is not None
    ]


class ConstantSink:
    """A beginning-token sink whose logit is the same constant for every query of every ``attn2``.

    Stable Diffusion inherits its BOS sink from pretrained CLIP: BOS's output is a "massive
    activation" that every query matches, so for an ordinary prompt most cross-attention mass
    sits on BOS and only what must be read from the text leaves it. A model trained from scratch
    in a few CPU hours grows no such sink, and a sink that training may reshape erodes (earlier
    versions of this testbed: seeded at +6, it fell to a mean BOS mass of 0.27 and two layers
    turned their queries away from it, making the BOS logit negative). So here the sink is part
    of the architecture, exactly and for every query, and everything else trains:

    - ``norm2`` (the LayerNorm before ``attn2``): its last ``SINK_CHANNELS`` outputs have gain 0
      and bias 1, so they are exactly 1 at every pixel, whatever the residual stream holds;
    - ``to_k``: the BOS key W_k h_BOS = k0 is held (the frozen encoder's BOS output h_BOS is a
      constant), |k0_h| = K per head; every other direction of W_k trains freely;
    - ``to_q``: the sink channels' columns hold alpha k0_h / K per head, and every other column
      is kept orthogonal to k0_h. The query's component along the BOS key is then alpha for every
      pixel, and the BOS logit alpha K / sqrt(d) = ``logit``.

    :meth:`apply` re-imposes the three constraints after every optimizer step (with AdamW's
    element-wise steps a gradient projection would not keep them; projecting the weights does,
    exactly up to rounding). The constraints are affine, so an exponential moving average of
    constrained weights satisfies them too. A token can still outbid BOS for any query, but only
    by a logit above ``logit`` minus the log of how many copies of it there are (ln 59 = 4.1 for
    the padding tokens): with 12 nats, an ordinary caption leaves most mass on BOS.
    """

    def __init__(self, unet, text_encoder, logit: float = SINK_LOGIT) -> None:
        h = _bos_hidden(text_encoder)
        u = h / h.norm()
        self.logit = logit
        self.items = []
        with torch.no_grad():
            for block in _cross_attention_blocks(unet):
                attn, norm = block.attn2, block.norm2
                if attn.to_q.bias is not None or attn.to_k.bias is not None:
                    raise ValueError("ConstantSink needs to_q and to_k without bias")
                c = norm.normalized_shape[0]
                sink = torch.arange(c - SINK_CHANNELS, c)
                other = torch.arange(c - SINK_CHANNELS)
                d = attn.to_q.weight.shape[0] // attn.heads
                big_k = math.sqrt(logit * math.sqrt(d))  # alpha = K: alpha K / sqrt(d) = logit
                k0 = attn.to_k.weight @ u.to(attn.to_k.weight.dtype)
                khat = torch.stack(
                    [
                        k0[i * d : (i + 1) * d] / k0[i * d : (i + 1) * d].norm()
                        for i in range(attn.heads)
                    ]
                )
                # W_k h_BOS = K khat_h per head, i.e. W_k u = K khat_h / |h_BOS|
                self.items.append(
                    {
                        "attn": attn,
                        "norm": norm,
                        "u": u.clone(),
                        "k0": (big_k * khat).flatten() / h.norm(),
                        "khat": khat,
                        "alpha": big_k,
                        "sink": sink,
                        "other": other,
                        "d": d,
                    }
                )
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for it in self.items:
            attn, norm, d = it["attn"], it["norm"], it["d"]
            norm.weight[it["sink"]] = 0.0
            norm.bias[it["sink"]] = 1.0
            wk, wq = attn.to_k.weight, attn.to_q.weight
            wk -= torch.outer(wk @ it["u"] - it["k0"], it["u"])
            for i in range(attn.heads):
                rows = wq[i * d : (i + 1) * d]
                kh = it["khat"][i]
                other = rows[:, it["other"]]
                rows[:, it["other"]] = other - torch.outer(kh, kh @ other)
                rows[:, it["sink"]] = (it["alpha"] / SINK_CHANNELS) * kh[:, None]

    def to(self, device) -> ConstantSink:
        for it in self.items:
            for k in ("u", "k0", "khat", "sink", "other"):
                it[k] = it[k].to(device)
        return self


class EMA:
    """Exponential moving average of a module's parameters (decay ``min(decay, (1+n)/(10+n))``
    after n updates, the usual warm-up), exported instead of the last training step's weights."""

    def __init__(self, module, decay: float = EMA_DECAY) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}

    def copy_to(self, module) -> None:
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})


def learning_rate(
    step: int, total: int, base: float, warmup: int, decay_share: float = 0.3, floor: float = 0.1
) -> float:
    """Linear warm-up, constant, then a cosine from ``base`` to ``floor * base`` over the last
    ``decay_share`` of ``total`` steps."""
    lr = base * min(1.0, (step + 1) / warmup)
    start = total * (1 - decay_share)
    if step >= start:
        f = (step - start) / max(1.0, total - start)
        lr *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * f))
    return lr


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


def plot_losses(losses: list[float], path: Path, first_step: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(losses)
    k = max(1, len(x) // 50)
    smooth = np.convolve(x, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(np.arange(len(x)) + first_step, x, lw=0.3, alpha=0.4, label="per step")
    ax.plot(np.arange(len(smooth)) + first_step + k - 1, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("training step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def export(
    unet, text_encoder, out: Path, info: dict, losses: list[float], first_step: int = 0
) -> None:
    """Write the diffusers folder: UNet in fp32, the frozen text encoder's weights in fp16
    (its config keeps ``float32``, so it loads in fp32 with or without ``torch_dtype``)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(unet.eval(), text_encoder.eval())
    pipe.save_pretrained(out, safe_serialization=True)
    te_file = out / "text_encoder" / "model.safetensors"
    save_file(
        {k: v.half().contiguous() for k, v in load_file(te_file).items()},
        te_file,
        metadata={"format": "pt"},
    )
    # transformers writes tokenizer.json indented (3.6 MB); the same JSON compact is 1.7 MB.
    tok = out / "tokenizer" / "tokenizer.json"
    if tok.exists():
        compact = json.dumps(
            json.loads(tok.read_text("utf-8")), ensure_ascii=False, separators=(",", ":")
        )
        tok.write_text(compact, "utf-8")
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    if losses:
        plot_losses(losses, out / "loss.png", first_step)


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """(len(captions), 77, width) text states of the frozen encoder, padded as SD pads."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=CONTEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids).last_hidden_state


class TextCache:
    """The frozen encoder's states of captions that repeat (memorized items, the empty
    caption), computed once; fresh negatives are encoded per batch."""

    def __init__(self, text_encoder, tokenizer, repeated: list[str]) -> None:
        self.te, self.tok = text_encoder, tokenizer
        self.cache: dict[str, torch.Tensor] = {}
        for b in range(0, len(repeated), 64):
            chunk = repeated[b : b + 64]
            for c, h in zip(chunk, encode_captions(text_encoder, tokenizer, chunk)):
                self.cache[c] = h

    def __call__(self, captions: list[str]) -> torch.Tensor:
        fresh = sorted({c for c in captions if c not in self.cache})
        new = dict(zip(fresh, encode_captions(self.te, self.tok, fresh))) if fresh else {}
        return torch.stack([self.cache[c] if c in self.cache else new[c] for c in captions])


def continue_from(folder: Path, unet, text_encoder, seed: int) -> dict:
    """Load an exported folder's UNet into ``unet`` (after checking that it is of this run: its
    seed, and a text encoder equal, to fp16 rounding, to the one this seed builds); returns
    what ``training.json`` records as ``continued_from``."""
    from safetensors.torch import load_file

    info = json.loads((folder / "training.json").read_text())
    if info.get("seed") != seed:
        raise ValueError(f"{folder} was trained with seed {info.get('seed')}, not {seed}")
    te = load_file(folder / "text_encoder" / "model.safetensors")
    for k, v in text_encoder.state_dict().items():
        if k in te and not torch.equal(te[k].float(), v.half().float()):
            raise ValueError(f"{folder}: text encoder weight {k} is not the one seed {seed} builds")
    unet.load_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return {
        "step": int(info["steps"]),
        "folder": str(folder),
        "weights": "the folder's EMA weights (as trained and averaged weights)",
        "optimizer": "fresh AdamW moments",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    ap.add_argument("--workdir", type=Path, required=True, help="checkpoint and log folder")
    ap.add_argument("--steps", type=int, default=10000, help="length of the run (lr schedule)")
    ap.add_argument(
        "--stop-at", type=int, default=None, help="leave after this step (a chunk of the run)"
    )
    ap.add_argument(
        "--snapshots",
        default="6000",
        help="comma-separated steps whose EMA weights are kept in the workdir (ema_<step>.pt)",
    )
    ap.add_argument(
        "--export-snapshot",
        type=int,
        default=None,
        help="write --out from the workdir's ema_<step>.pt and leave (no training)",
    )
    ap.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="exported folder of this run to continue from when the workdir has no checkpoint",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: the device's")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=data.SEED, help="dataset and weight seed")
    ap.add_argument("--p-mem", type=float, default=0.35, help="share of memorized samples")
    ap.add_argument("--p-drop", type=float, default=0.1, help="share of dropped captions (CFG)")
    ap.add_argument(
        "--offset-noise",
        type=float,
        default=0.1,
        help="std of a per-image, per-channel constant added to the noise (see the docstring)",
    )
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    preset = dict(PRESETS[args.preset or args.device])
    bs = args.batch_size or preset["batch_size"]
    lr = args.lr or preset["lr"]
    warmup = preset["warmup"]
    stop = min(args.steps, args.stop_at or args.steps)
    snapshots = {int(s) for s in args.snapshots.split(",") if s.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.device == "cuda"

    from tqdm import tqdm

    torch.manual_seed(args.seed)
    unet = build_unet()
    text_encoder = build_text_encoder().eval().requires_grad_(False)
    sink = ConstantSink(unet, text_encoder)
    ema = EMA(unet)
    unet, text_encoder = unet.to(device).train(), text_encoder.to(device)
    sink.to(device)
    tokenizer = clip_tokenizer("sd1")
    alphas = alphas_cumprod()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "checkpoint.pt"
    start, losses, continued = 0, [], None

    def run_info(step: int, wall: float) -> dict:
        seen, with_caption = data.exposures(args.seed, step, bs, args.p_mem, args.p_drop)
        return {
            "steps": step,
            "batch_size": bs,
            "lr": lr,
            "lr_schedule": "linear warm-up, constant, cosine to 0.1x over the last 30 %",
            "warmup": warmup,
            "ema_decay": EMA_DECAY,
            "exported": "EMA weights",
            "seed": args.seed,
            "p_mem": args.p_mem,
            "p_drop": args.p_drop,
            "offset_noise": args.offset_noise,
            "text_encoder": f"frozen, random, width {TEXT_HIDDEN}, {TEXT_LAYERS} layers",
            "bos_sink": f"constant logit {SINK_LOGIT} in every attn2 (ConstantSink)",
            "device": args.device,
            "samples": step * bs,
            "wall_s": wall,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
            **({"continued_from": continued} if continued else {}),
            "memorized_exposures": seen.tolist(),
            "memorized_exposures_with_caption": with_caption.tolist(),
            "torch": torch.__version__,
        }

    if args.export_snapshot is not None:
        n = args.export_snapshot
        ema.load_state_dict(torch.load(args.workdir / f"ema_{n}.pt"))
        ema.copy_to(unet)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        keys = ("seed", "batch_size", "lr", "preset", "device", "p_mem", "p_drop", "offset_noise")
        other = [k for k in keys if state["args"][k] != str(getattr(args, k))]
        if other:  # the snapshot's training.json is written from these arguments
            raise SystemExit(f"--export-snapshot: give the run's own {', '.join(other)}")
        continued = state.get("continued_from")
        first = continued["step"] if continued else 0
        losses = state["losses"][: n - first]  # losses[i] is of step first + i
        info = dict(run_info(n, None), snapshot_of_run=state["run_steps"])  # wall: not per step
        export(unet.float().cpu(), text_encoder.float().cpu(), args.out, info, losses, first)
        print(f"exported the EMA weights of step {n} to {args.out}")
        return
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
        continued = state.get("continued_from")
        torch.set_rng_state(state["rng"])
        print(f"resumed from {ckpt} at step {start}", flush=True)
    elif args.continue_from is not None:
        continued = continue_from(args.continue_from, unet, text_encoder, args.seed)
        sink.apply()
        ema = EMA(unet)
        ema.updates = start = continued["step"]
        print(f"continuing from {args.continue_from} at step {start}", flush=True)
    first_step = continued["step"] if continued else 0

    wall = state["wall_s"] if ckpt.exists() else 0.0

    def save(step: int) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "losses": losses,
                "rng": torch.get_rng_state(),
                "wall_s": wall,
                "continued_from": continued,
                "run_steps": args.steps,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            tmp,
        )
        os.replace(tmp, ckpt)
        if step in snapshots:
            torch.save(ema.state_dict(), args.workdir / f"ema_{step}.pt")

    encode = TextCache(
        text_encoder, tokenizer, ["", *(m.caption for m in data.memorized_items(args.seed))]
    )
    t0 = time.time()
    bar = tqdm(range(start, stop), initial=start, total=args.steps, smoothing=0.05)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, args.steps, lr, warmup)
        captions, x0, noise, t, xt = noised_batch(
            args.seed, step, bs, args.p_mem, args.p_drop, args.offset_noise, alphas
        )
        noise, t, xt = noise.to(device), t.to(device), xt.to(device)
        cond = encode(captions)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            pred = unet(xt, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sink.apply()
        ema.update(unet)
        losses.append(float(loss))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == stop or step + 1 in snapshots:
            wall += time.time() - t0
            t0 = time.time()
            save(step + 1)
    bar.close()
    if stop < args.steps:
        print(f"stopped at step {stop} of {args.steps}; run again to continue", flush=True)
        return
    info = run_info(args.steps, round(wall, 1))
    ema.copy_to(unet)
    export(unet.float().cpu(), text_encoder.float().cpu(), args.out, info, losses, first_step)
    print(json.dumps({k: v for k, v in info.items() if "exposures" not in k}), flush=True)


if __name__ == "__main__":
    main()
