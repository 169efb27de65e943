"""The built-in demo dataset: a multi-label image-caption set generated offline from a seed.

Each item is a small picture of 1-4 objects drawn from 12 classes and a caption about it. Neither
modality alone is trivially perfect:

- images: objects are placed at random, overlap (later ones occlude earlier ones), are sometimes
  tiny, sit on noisy backgrounds with clutter strokes, and their colours are jittered;
- captions: each label is omitted with some probability, classes are named by synonyms, objects
  that are not classes ("grass", "road") and filler words are mixed in, and word order varies.

Objects co-occur through three "scenes" (sky, sea, town), so labels are correlated as in real
data. Everything is deterministic in ``seed``: the same seed gives byte-identical Parquet files.
"""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from dcgh_dist.data.format import DatasetInfo, write_dataset
from dcgh_dist.storage import publish_dir

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
CLASS_NAMES = (
    "sun", "moon", "star", "cloud", "bird", "mountain",
    "boat", "fish", "tree", "house", "car", "flower",
)
SYNONYMS = {
    "sun": ["sun", "sunshine disc", "sun"],
    "moon": ["moon", "crescent", "half moon"],
    "star": ["star", "starlet", "twinkling star"],
    "cloud": ["cloud", "puffy cloud", "cloudlet"],
    "bird": ["bird", "seagull", "sparrow"],
    "mountain": ["mountain", "peak", "hill"],
    "boat": ["boat", "ship", "sailboat"],
    "fish": ["fish", "goldfish", "trout"],
    "tree": ["tree", "pine", "fir"],
    "house": ["house", "cottage", "home"],
    "car": ["car", "automobile", "vehicle"],
    "flower": ["flower", "blossom", "daisy"],
}
SCENES = {
    "sky": ["sun", "moon", "star", "cloud", "bird", "mountain"],
    "sea": ["boat", "fish", "cloud", "sun", "bird"],
    "town": ["tree", "house", "car", "flower", "bird"],
}
ADJECTIVES = ["small", "big", "bright", "old", "colorful", "quiet", "lovely", "simple", "blurry"]
FILLERS = [
    "on a sunny afternoon", "in the evening", "seen from far away", "with some grass",
    "near a road", "by the water", "under a grey sky", "in a children's drawing",
    "photo taken yesterday", "with a red frame", "on a windy day", "next to a fence",
]
TEMPLATES = [
    "a picture of {objs}",
    "{objs} {filler}",
    "there is {objs} {filler}",
    "an image showing {objs}",
    "{filler}: {objs}",
    "a {adj} scene with {objs}",
    "look at {objs}",
]

# Base colours per class (RGB); jittered per drawing.
COLORS = {
    "sun": (250, 200, 30), "moon": (230, 230, 200), "star": (255, 240, 90),
    "cloud": (245, 245, 250), "bird": (40, 40, 40), "mountain": (120, 110, 100),
    "boat": (170, 90, 40), "fish": (250, 120, 20), "tree": (30, 140, 50),
    "house": (200, 60, 50), "car": (40, 80, 210), "flower": (230, 70, 180),
}


def _jitter(rgb, rng, amount=40):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_object(d: ImageDraw.ImageDraw, name: str, cx: float, cy: float, s: float, rng) -> None:
    """Draw one object of class ``name`` centred at (cx, cy) with size ``s`` pixels."""
    c = _jitter(COLORS[name], rng)
    h = s / 2
    if name == "sun":
        d.ellipse([cx - h * 0.6, cy - h * 0.6, cx + h * 0.6, cy + h * 0.6], fill=c)
        for k in range(8):
            a = k * math.pi / 4
            d.line([cx + math.cos(a) * h * 0.7, cy + math.sin(a) * h * 0.7,
                    cx + math.cos(a) * h, cy + math.sin(a) * h], fill=c, width=max(1, int(s / 12)))
    elif name == "moon":
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=c)
        d.ellipse([cx - h * 0.4, cy - h * 1.0, cx + h * 1.4, cy + h * 0.8], fill=(20, 20, 60))
    elif name == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.4
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=c)
    elif name == "cloud":
        for dx, dy, r in ((-0.4, 0.1, 0.45), (0.0, -0.15, 0.55), (0.45, 0.1, 0.4)):
            d.ellipse([cx + dx * s - r * h, cy + dy * s - r * h, cx + dx * s + r * h, cy + dy * s + r * h], fill=c)
    elif name == "bird":
        w = max(1, int(s / 10))
        d.line([cx - h, cy - h * 0.3, cx, cy + h * 0.2, cx + h, cy - h * 0.3], fill=c, width=w)
    elif name == "mountain":
        d.polygon([(cx - h, cy + h * 0.7), (cx, cy - h), (cx + h, cy + h * 0.7)], fill=c)
        d.polygon([(cx - h * 0.25, cy - h * 0.5), (cx, cy - h), (cx + h * 0.25, cy - h * 0.5)], fill=(250, 250, 250))
    elif name == "boat":
        d.polygon([(cx - h, cy + h * 0.2), (cx + h, cy + h * 0.2), (cx + h * 0.6, cy + h * 0.7), (cx - h * 0.6, cy + h * 0.7)], fill=c)
        d.polygon([(cx, cy - h), (cx, cy + h * 0.15), (cx + h * 0.7, cy + h * 0.15)], fill=(240, 240, 240))
    elif name == "fish":
        d.ellipse([cx - h * 0.7, cy - h * 0.4, cx + h * 0.5, cy + h * 0.4], fill=c)
        d.polygon([(cx + h * 0.4, cy), (cx + h, cy - h * 0.45), (cx + h, cy + h * 0.45)], fill=c)
    elif name == "tree":
        d.rectangle([cx - h * 0.15, cy + h * 0.2, cx + h * 0.15, cy + h], fill=(100, 60, 20))
        d.polygon([(cx - h * 0.7, cy + h * 0.35), (cx, cy - h), (cx + h * 0.7, cy + h * 0.35)], fill=c)
    elif name == "house":
        d.rectangle([cx - h * 0.6, cy - h * 0.1, cx + h * 0.6, cy + h], fill=(220, 200, 160))
        d.polygon([(cx - h * 0.8, cy - h * 0.1), (cx, cy - h), (cx + h * 0.8, cy - h * 0.1)], fill=c)
    elif name == "car":
        d.rectangle([cx - h, cy - h * 0.1, cx + h, cy + h * 0.4], fill=c)
        d.rectangle([cx - h * 0.5, cy - h * 0.5, cx + h * 0.4, cy - h * 0.1], fill=c)
        for wx in (-0.55, 0.55):
            d.ellipse([cx + wx * h - h * 0.22, cy + h * 0.25, cx + wx * h + h * 0.22, cy + h * 0.7], fill=(20, 20, 20))
    elif name == "flower":
        for k in range(5):
            a = k * 2 * math.pi / 5
            px, py = cx + math.cos(a) * h * 0.5, cy + math.sin(a) * h * 0.5
            d.ellipse([px - h * 0.35, py - h * 0.35, px + h * 0.35, py + h * 0.35], fill=c)
        d.ellipse([cx - h * 0.25, cy - h * 0.25, cx + h * 0.25, cy + h * 0.25], fill=(250, 230, 40))
    else:  # pragma: no cover - guarded by CLASS_NAMES
        raise ValueError(name)


def _render(objs: list[str], size: int, rng: np.random.Generator) -> bytes:
    top = _jitter((90, 130, 190), rng, 60)
    bottom = _jitter((90, 150, 90), rng, 60)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    bg = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    bg = np.broadcast_to(bg, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # clutter strokes
        xy = rng.uniform(0, size, 4).tolist()
        d.line(xy, fill=_jitter((128, 128, 128), rng, 100), width=int(rng.integers(1, 3)))
    for name in objs:
        small = rng.random() < 0.15
        s = float(rng.uniform(0.14, 0.2) if small else rng.uniform(0.25, 0.48)) * size
        cx, cy = rng.uniform(s / 2, size - s / 2, 2)
        _draw_object(d, name, float(cx), float(cy), s, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _sample_objects(rng: np.random.Generator) -> list[str]:
    n = int(rng.choice([1, 2, 3, 4], p=[0.12, 0.33, 0.38, 0.17]))
    scene = SCENES[str(rng.choice(list(SCENES)))]
    objs: list[str] = []
    while len(objs) < n:
        pool = scene if rng.random() < 0.8 else list(CLASS_NAMES)
        name = str(rng.choice(pool))
        if name not in objs:
            objs.append(name)
    return objs


def _caption(objs: list[str], rng: np.random.Generator) -> str:
    kept = [o for o in objs if rng.random() > 0.25]  # omit a label a quarter of the time
    if not kept and rng.random() < 0.9:
        kept = [objs[int(rng.integers(len(objs)))]]
    rng.shuffle(kept)
    phrases = []
    for o in kept:
        word = str(rng.choice(SYNONYMS[o]))
        adj = str(rng.choice(ADJECTIVES)) + " " if rng.random() < 0.4 else ""
        phrases.append(f"a {adj}{word}")
    if rng.random() < 0.3:  # a non-class object as a distractor
        phrases.append(str(rng.choice(["some grass", "a road", "the water", "a fence", "a rock"])))
    if not phrases:
        phrases = ["something"]
    objs_text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    tpl = str(rng.choice(TEMPLATES))
    return tpl.format(objs=objs_text, filler=str(rng.choice(FILLERS)), adj=str(rng.choice(ADJECTIVES)))


def demo_info() -> DatasetInfo:
    return DatasetInfo(
        name="demo",
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        description=f"dcgh-dist synthetic image-caption demo v{DEMO_VERSION}",
    )


def demo_split_sizes(size: int) -> dict[str, int]:
    """query 10%, val 5%, train 50%, the rest db (train and val are part of the database too)."""
    q = max(20, size // 10)
    v = max(20, size // 20)
    t = size // 2
    return {"query": q, "val": v, "train": t, "db": size - q - v - t}


def generate_demo_dataset(
    out_dir: str, size: int = 4000, seed: int = 0, image_size: int = 64, rows_per_file: int = 1000
) -> DatasetInfo:
    """Write the demo dataset to ``out_dir`` (local). Deterministic in ``seed``."""
    if size < 100:
        raise ValueError("demo dataset size must be >= 100")
    rng = np.random.default_rng(seed)
    sizes = demo_split_sizes(size)
    splits = np.concatenate([np.full(n, s) for s, n in sizes.items()])
    rng.shuffle(splits)
    index = {n: i for i, n in enumerate(CLASS_NAMES)}
    rows = []
    for i in range(size):
        objs = _sample_objects(rng)
        rows.append(
            {
                "id": i,
                "labels": sorted(index[o] for o in objs),
                "split": str(splits[i]),
                "image": _render(objs, image_size, rng),
                "text": _caption(objs, rng),
            }
        )
    info = demo_info()
    write_dataset(out_dir, info, rows, rows_per_file=rows_per_file)
    return info


def default_data_root(configured: str | None = None) -> str:
    return configured or os.environ.get("DCGH_DATA_ROOT") or os.path.join(
        os.path.expanduser("~"), ".cache", "dcgh_dist"
    )


def ensure_demo_dataset(size: int = 4000, seed: int = 0, data_root: str | None = None) -> str:
    """Path of the demo dataset with these parameters, generating it once if missing."""
    return ensure_generated(
        f"demo-v{DEMO_VERSION}-n{size}-s{seed}", lambda d: generate_demo_dataset(d, size=size, seed=seed),
        data_root, f"demo dataset ({size} pairs, seed {seed})",
    )


def ensure_features_demo(seed: int = 0, data_root: str | None = None) -> str:
    """Path of the ``demo-features`` dataset (dcgh_dist.data.demo_features), generated once."""
    from dcgh_dist.data.demo_features import FEATURES_DEMO_VERSION, generate_features_demo

    return ensure_generated(f"demo-features-v{FEATURES_DEMO_VERSION}-s{seed}",
                            lambda d: generate_features_demo(d, seed=seed), data_root,
                            f"feature demo dataset (seed {seed})")


def ensure_generated(dirname: str, generate, data_root: str | None, what: str) -> str:
    """``<data root>/<dirname>``, calling ``generate(dir)`` once if it holds no dataset yet.

    Generated into a temporary directory and renamed into place, so concurrent callers (several
    test processes, say) never see a half-written dataset.
    """
    root = default_data_root(data_root)
    path = os.path.join(root, dirname)
    if os.path.exists(os.path.join(path, "dataset.json")):
        return path
    logger.info("generating %s in %s", what, path)
    publish_dir(path, generate, marker="dataset.json")
    return path
