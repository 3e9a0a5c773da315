"""Dataset of the attnmem testbed: captions and 32x32 images, deterministic from one seed.

Every item, memorized or not, comes from the same generator:

- **attributes**: a foreground colour (8), a shape (3) and a position (5); the caption states
  all three, in LAION-like wording (several word orders, optional lead phrase, 0-6 filler words
  and an optional product code), so lengths and styles vary within every group in the same way;
- **details**: what the caption does not say and only memorization can reproduce: the whole
  background (a random base colour, a low-frequency colour field and 2-4 "clutter" rectangles),
  +-2 px position jitter and the shape's size, all drawn from the item's own random stream. Most
  of every image is background, so for a caption the model has not memorized most pixels need
  nothing from the text (as in real photos, where most of the image is not in the caption):
  the situation in which an attention layer parks its attention on a constant "sink" token.

Groups (disjoint random streams of the same generator, so they differ only in how often they
are seen):

- ``memorized``: 100 items in 5 dose groups of 20; dose group g is sampled with weight 2**g, so
  the groups are seen about 1 : 2 : 4 : 8 : 16 times as often (exact counts:
  :func:`exposures`);
- training negatives: an endless stream, one fresh item per training sample (item index =
  step x batch + slot), so no negative image or caption is ever seen twice;
- ``heldout``: negatives never trained on, fixed here before any evaluation;
- ``twins``: for an item, other renderings with the *same* attributes and fresh details; the
  memorization test asks whether a generation is nearer to the training image than to its
  twins (chance 1/(K+1) for a model that only follows the caption).

Images are float32 in [-1, 1], shape (3, 32, 32) (channels first), which is also the
testbed's latent space (see ``train.py``: the VAE is a fixed near-identity map).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SIZE = 32
SEED = 20240311  # default dataset seed (arXiv 2403.11052)

FG = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (50, 200, 70),
    "blue": (50, 110, 250),
    "purple": (150, 60, 200),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "left": (8, 16),
    "right": (24, 16),
    "top": (16, 8),
    "bottom": (16, 24),
    "center": (16, 16),
}
POS_PHRASES = {
    "left": ("on the left", "at left", "left side"),
    "right": ("on the right", "at right", "right side"),
    "top": ("at the top", "on top", "top"),
    "bottom": ("at the bottom", "bottom"),
    "center": ("in the center", "centered", "in the middle"),
}
LEADS = (
    "",
    "",
    "a ",
    "stock photo of a ",
    "vector illustration of a ",
    "poster with a ",
    "minimalist art print, a ",
    "wallpaper, a ",
    "logo design: ",
    "photo of a ",
)
FILLER = (
    "vintage",
    "hd",
    "4k",
    "free download",
    "premium",
    "canvas print",
    "wall art",
    "design",
    "modern",
    "retro",
    "icon",
    "pattern",
    "sticker",
    "t-shirt",
    "studio",
    "collection",
    "set",
    "edition",
    "acme",
    "zenith",
    "nordic",
    "aurora",
    "flat",
    "abstract",
    "classic",
    "deluxe",
    "official",
    "series",
    "limited",
    "home decor",
    "gift",
    "print",
    "new",
    "best",
    "sale",
    "original",
    "art",
    "shop",
    "color",
    "style",
    "graphic",
    "background",
    "image",
    "royalty free",
    "illustration",
    "kids",
    "summer",
    "winter",
    "texture",
    "simple",
    "bold",
    "bright",
)
CODE_LETTERS = "ABCDEFGHJKLMNPRSTVWXZ"

N_MEMORIZED = 100
DOSE_GROUPS = 5  # 20 items each; group g is sampled with weight 2**g
N_HELDOUT = 400
NS_MEM, NS_STREAM, NS_HELDOUT, NS_TWIN, NS_SCHEDULE = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Item:
    """One caption-image pair. ``kind``: memorized / negative / heldout; ``index`` within it."""

    kind: str
    index: int
    caption: str
    color: str
    shape: str
    position: str
    dose_group: int = -1  # memorized only

    @property
    def attrs(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.position)


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed, *path])


# -- captions ---------------------------------------------------------------------------------
def _caption(rng: np.random.Generator, color: str, shape: str, pos: str) -> str:
    lead = LEADS[rng.integers(len(LEADS))]
    where = POS_PHRASES[pos][rng.integers(len(POS_PHRASES[pos]))]
    order = rng.integers(3)
    if order == 0:
        core = f"{lead}{color} {shape} {where}"
    elif order == 1:
        core = f"{lead}{shape} in {color}, {where}"
    else:
        core = f"{lead}{color} {shape} shape {where}"
    words = [FILLER[i] for i in rng.choice(len(FILLER), size=rng.integers(0, 7), replace=False)]
    if rng.random() < 0.5:
        letters = "".join(rng.choice(list(CODE_LETTERS), size=rng.integers(2, 4)))
        words.append(f"{letters} {rng.integers(100, 100000)}")
    tail = (" - " if rng.random() < 0.3 else ", ") + " ".join(words) if words else ""
    return core + tail


def _draw_item(rng: np.random.Generator, kind: str, index: int, dose_group: int = -1) -> Item:
    color = list(FG)[rng.integers(len(FG))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    return Item(kind, index, _caption(rng, color, shape, pos), color, shape, pos, dose_group)


@functools.lru_cache(maxsize=8)
def memorized_items(seed: int = SEED) -> tuple[Item, ...]:
    per = N_MEMORIZED // DOSE_GROUPS
    out, seen = [], set()
    i = 0
    while len(out) < N_MEMORIZED:
        item = _draw_item(_rng(seed, NS_MEM, i), "memorized", len(out), len(out) // per)
        i += 1
        if item.caption not in seen:
            seen.add(item.caption)
            out.append(item)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def heldout_items(seed: int = SEED, n: int = N_HELDOUT) -> tuple[Item, ...]:
    """Negatives never trained on (their captions are excluded from the training stream)."""
    taken = {m.caption for m in memorized_items(seed)}
    out, i = [], 0
    while len(out) < n:
        item = _draw_item(_rng(seed, NS_HELDOUT, i), "heldout", len(out))
        i += 1
        if item.caption not in taken:
            taken.add(item.caption)
            out.append(item)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _reserved(seed: int) -> frozenset[str]:
    return frozenset(m.caption for m in memorized_items(seed)) | frozenset(
        h.caption for h in heldout_items(seed)
    )


def negative_item(seed: int, index: int) -> Item:
    """Training negative ``index`` (seen once): never a memorized or held-out caption."""
    reserved = _reserved(seed)
    k = 0
    while True:
        item = _draw_item(_rng(seed, NS_STREAM, index, k), "negative", index)
        if item.caption not in reserved:
            return item
        k += 1


def dose_weights() -> np.ndarray:
    per = N_MEMORIZED // DOSE_GROUPS
    w = np.array([2.0 ** (i // per) for i in range(N_MEMORIZED)])
    return w / w.sum()


# -- images -----------------------------------------------------------------------------------
_SS = 2  # supersampling factor for anti-aliased edges
_YY, _XX = np.mgrid[0 : SIZE * _SS, 0 : SIZE * _SS].astype(np.float32)
_YY = (_YY + 0.5) / _SS
_XX = (_XX + 0.5) / _SS


def _shape_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    r = size / 2
    if shape == "circle":
        m = (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r
    elif shape == "square":
        r = r * 0.88
        m = (np.abs(_XX - cx) <= r) & (np.abs(_YY - cy) <= r)
    else:  # triangle pointing up
        top, base = cy - r, cy + r * 0.8
        half = (_YY - top) / (base - top) * r * 1.1
        m = (_YY >= top) & (_YY <= base) & (np.abs(_XX - cx) <= half)
    return m.astype(np.float32).reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def _upsample(small: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of (k, k, 3) to (SIZE, SIZE, 3)."""
    k = small.shape[0]
    g = (np.arange(SIZE) + 0.5) / SIZE * k - 0.5
    g = np.clip(g, 0, k - 1)
    i0 = np.floor(g).astype(int)
    i1 = np.minimum(i0 + 1, k - 1)
    f = (g - i0)[:, None]
    rows = small[i0] * (1 - f)[:, :, None] + small[i1] * f[:, :, None]
    rows = rows.transpose(1, 0, 2)
    out = rows[i0] * (1 - f)[:, :, None] + rows[i1] * f[:, :, None]
    return out.transpose(1, 0, 2)


BG_NEUTRAL = 0.3  # the clean template's background


def render(attrs: tuple[str, str, str], rng: np.random.Generator | None) -> np.ndarray:
    """(3, 32, 32) float32 in [-1, 1]. ``rng=None``: the clean template (no details, a flat
    neutral background)."""
    color, shape, pos = attrs
    img = np.empty((SIZE, SIZE, 3), np.float32)
    cx, cy = POSITIONS[pos]
    size = 12.0
    if rng is None:
        img[:] = BG_NEUTRAL
    else:
        img[:] = rng.uniform(0.0, 0.6, size=3).astype(np.float32)
        img += _upsample(rng.normal(0, 0.15, size=(4, 4, 3)).astype(np.float32))
        for _ in range(rng.integers(2, 5)):
            w, h = rng.integers(2, 6, size=2)
            x0, y0 = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 1, size=3)
        cx += rng.uniform(-2, 2)
        cy += rng.uniform(-2, 2)
        size = rng.uniform(10, 14)
    m = _shape_mask(shape, cx, cy, size)[:, :, None]
    img = img * (1 - m) + m * (np.array(FG[color], np.float32) / 255)
    return (np.clip(img, 0, 1) * 2 - 1).transpose(2, 0, 1).astype(np.float32)


def item_image(seed: int, item: Item) -> np.ndarray:
    """The item's (training, for memorized/negative) image."""
    ns = {"memorized": NS_MEM, "negative": NS_STREAM, "heldout": NS_HELDOUT}[item.kind]
    return render(item.attrs, _rng(seed, ns, item.index, 999))


def twin_images(seed: int, item: Item, k: int) -> np.ndarray:
    """(k, 3, 32, 32): same attributes, fresh details (never trained on)."""
    ns = {"memorized": NS_MEM, "negative": NS_STREAM, "heldout": NS_HELDOUT}[item.kind]
    return np.stack([render(item.attrs, _rng(seed, NS_TWIN, ns, item.index, j)) for j in range(k)])


@functools.lru_cache(maxsize=2)
def templates() -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """All 120 attribute combinations and their clean renderings (120, 3, 32, 32)."""
    combos = [(c, s, p) for c in FG for s in SHAPES for p in POSITIONS]
    return combos, np.stack([render(a, None) for a in combos])


@functools.lru_cache(maxsize=1)
def _layout_masks() -> tuple[list[tuple[str, str]], np.ndarray]:
    """Soft masks of every shape and position at the sizes and offsets the details allow."""
    layouts, masks = [], []
    for s in SHAPES:
        for p, (cx, cy) in POSITIONS.items():
            for size in (10.0, 12.0, 14.0):
                for dx in (-2.0, 0.0, 2.0):
                    for dy in (-2.0, 0.0, 2.0):
                        layouts.append((s, p))
                        masks.append(_shape_mask(s, cx + dx, cy + dy, size))
    return layouts, np.stack(masks).reshape(len(layouts), -1).astype(np.float64)


def classify(images: np.ndarray) -> list[tuple[str, str, str]]:
    """Attribute classifier for (N, 3, 32, 32) images in [-1, 1].

    Shape and position: the (shape, position) mask whose two-region fit (one colour inside the
    mask, one outside) leaves the least squared residual; colour: the palette colour nearest
    to the fitted inside colour. Backgrounds are random, so a nearest-template rule would read
    the background instead of the object.
    """
    layouts, m = _layout_masks()  # (405, P)
    x = (images.reshape(len(images), 3, -1).astype(np.float64) + 1) / 2  # (N, 3, P)
    pal = np.array(list(FG.values()), np.float64) / 255
    n_in = m.sum(1)  # (405,)
    n_out = (1 - m).sum(1)
    s_in = np.einsum("ncp,lp->nlc", x, m)
    s_out = x.sum(2)[:, None, :] - s_in
    a, b = s_in / n_in[None, :, None], s_out / n_out[None, :, None]
    m2 = (m * m).sum(1)
    mo = (m * (1 - m)).sum(1)
    o2 = ((1 - m) ** 2).sum(1)
    xx = (x * x).sum(2)[:, None, :]
    # sum_p (x - m a - (1 - m) b)^2 per channel, expanded
    resid = (
        xx
        - 2 * a * s_in
        - 2 * b * s_out
        + a * a * m2[None, :, None]
        + 2 * a * b * mo[None, :, None]
        + b * b * o2[None, :, None]
    ).sum(2)
    best = resid.argmin(1)
    out = []
    for i, k in enumerate(best):
        inside = a[i, k]
        color = list(FG)[int(((pal - inside) ** 2).sum(1).argmin())]
        out.append((color, *layouts[k]))
    return out


# -- the training stream ----------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def memorized_images(seed: int = SEED) -> np.ndarray:
    return np.stack([item_image(seed, m) for m in memorized_items(seed)])


def batch_plan(seed: int, step: int, batch_size: int, p_mem: float, p_drop: float):
    """Which item each slot of training batch ``step`` holds: a list of (kind, index, drop)."""
    rng = _rng(seed, NS_SCHEDULE, step)
    mem = rng.random(batch_size) < p_mem
    which = rng.choice(N_MEMORIZED, size=batch_size, p=dose_weights())
    drop = rng.random(batch_size) < p_drop
    return [
        ("memorized", int(which[k]), bool(drop[k]))
        if mem[k]
        else ("negative", step * batch_size + k, bool(drop[k]))
        for k in range(batch_size)
    ]


def training_batch(seed: int, step: int, batch_size: int, p_mem: float = 0.2, p_drop: float = 0.1):
    """Captions (``""`` when dropped for classifier-free guidance) and images (B, 3, 32, 32)."""
    mems = memorized_items(seed)
    mem_imgs = memorized_images(seed)
    captions, images = [], []
    for kind, idx, drop in batch_plan(seed, step, batch_size, p_mem, p_drop):
        if kind == "memorized":
            item, img = mems[idx], mem_imgs[idx]
        else:
            item = negative_item(seed, idx)
            img = item_image(seed, item)
        captions.append("" if drop else item.caption)
        images.append(img)
    return captions, np.stack(images)


def exposures(seed: int, steps: int, batch_size: int, p_mem: float = 0.2, p_drop: float = 0.1):
    """(N_MEMORIZED,) how many times each memorized item was in the training stream (dropped captions
    counted too), and (N_MEMORIZED,) how many of those had their caption."""
    seen = np.zeros(N_MEMORIZED, int)
    with_caption = np.zeros(N_MEMORIZED, int)
    for s in range(steps):
        for kind, idx, drop in batch_plan(seed, s, batch_size, p_mem, p_drop):
            if kind == "memorized":
                seen[idx] += 1
                with_caption[idx] += not drop
    return seen, with_caption


# -- the bundled demo prompt file -------------------------------------------------------------
DEMO_MEMORIZED = tuple(range(84, 100))  # the last 16 of the highest dose group
DEMO_HELDOUT = tuple(range(384, 400))  # held-out negatives no validation set uses


def demo_prompts(seed: int = SEED) -> list[tuple[str, int]]:
    """(caption, label) of ``attnmem/data/testbed_prompts.txt``: memorized (1) and held-out
    (0) captions, alternating."""
    mem, held = memorized_items(seed), heldout_items(seed)
    out = []
    for m, h in zip(DEMO_MEMORIZED, DEMO_HELDOUT):
        out += [(mem[m].caption, 1), (held[h].caption, 0)]
    return out


if __name__ == "__main__":  # python -m research.testbed.data: rewrite the bundled demo prompt files
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "attnmem" / "data"
    pairs = demo_prompts()
    (root / "testbed_prompts.txt").write_text("".join(p + "\n" for p, _ in pairs))
    (root / "testbed_labels.txt").write_text("".join(f"{y}\n" for _, y in pairs))
