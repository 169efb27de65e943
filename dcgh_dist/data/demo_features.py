"""``demo-features``: a built-in feature dataset shaped like the public feature benchmarks.

Many cross-modal hashing papers report on datasets distributed as precomputed features rather than
pixels and captions: the Wikipedia set (2,866 pairs, 10 classes, 128-d SIFT bag-of-visual-words
histograms, 10-d LDA topic proportions), Pascal Sentence and NUS-WIDE's BoW features. This module
generates a dataset with that shape, offline and from a seed, so feature-dataset training, the
linear baseline and the feature towers can be run and measured without a download:

- single-label, 10 classes, 2,866 pairs; 693 queries, the other 2,173 the retrieval database and
  the training set, of which 10% are held out as ``val`` (as a user of ``write_dataset`` would);
- **image**: a 128-bin visual-word histogram (non-negative, L1-normalised, counts drawn from a
  multinomial of a few hundred words): weakly informative, as SIFT BoW is;
- **text**: 10-d topic proportions drawn from a Dirichlet: more informative, as LDA topics are;
- each class is a mixture of three sub-topics placed at random in a shared 16-d latent space, so
  classes are not linearly separable from either modality and a non-linear tower can beat the
  linear baseline, as on the real benchmarks.

It is not real data: figures on it say how the system behaves on data of this shape, not what a
paper's table would say (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np

from dcgh_dist.data.format import DatasetInfo, write_dataset

FEATURES_DEMO_VERSION = 1
NUM_CLASSES = 10
LATENT_DIM = 16
MODES_PER_CLASS = 3
IMAGE_DIM = 128
TEXT_DIM = 10
SPLIT_SIZES = {"query": 693, "train": 1956, "val": 217}  # 2,173 database rows, 10% of them val


def features_demo_info() -> DatasetInfo:
    return DatasetInfo(
        name="demo-features",
        num_classes=NUM_CLASSES,
        class_names=tuple(f"class{c}" for c in range(NUM_CLASSES)),
        image_column="image_features",
        text_column="text_features",
        image_feature_dim=IMAGE_DIM,
        text_feature_dim=TEXT_DIM,
        description=f"synthetic Wikipedia-shaped feature dataset v{FEATURES_DEMO_VERSION} (dcgh_dist.data.demo_features)",
    )


def split_sizes(size: int | None = None) -> dict[str, int]:
    """The splits of a ``size``-row dataset in the default's proportions (None: 2,866 rows)."""
    if size is None:
        return dict(SPLIT_SIZES)
    total = sum(SPLIT_SIZES.values())
    sizes = {k: max(2, round(v * size / total)) for k, v in SPLIT_SIZES.items() if k != "train"}
    sizes["train"] = size - sum(sizes.values())
    return sizes


def generate_features_demo(out_dir: str, seed: int = 0, size: int | None = None,
                           rows_per_file: int = 1000) -> DatasetInfo:
    """Write the dataset to ``out_dir`` (local). Deterministic in ``seed``; ``size`` scales it
    (benchmarks of larger feature datasets)."""
    rng = np.random.default_rng(seed)
    sizes = split_sizes(size)
    n = sum(sizes.values())
    modes = rng.standard_normal((NUM_CLASSES, MODES_PER_CLASS, LATENT_DIM)) * 1.6
    prior = rng.dirichlet(np.full(NUM_CLASSES, 4.0))  # unequal class sizes, as in Wikipedia
    labels = rng.choice(NUM_CLASSES, size=n, p=prior)
    latent = modes[labels, rng.integers(0, MODES_PER_CLASS, n)] + rng.standard_normal((n, LATENT_DIM))

    # image: a noisy view of the latent through a random map, then a bag of visual words
    a = rng.standard_normal((LATENT_DIM, IMAGE_DIM)) / np.sqrt(LATENT_DIM)
    logits = (latent + 1.4 * rng.standard_normal(latent.shape)) @ a * 1.2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    words = rng.integers(150, 600, n)
    image = np.stack([rng.multinomial(w, pi) for w, pi in zip(words, p)]).astype(np.float32)
    image /= image.sum(1, keepdims=True)

    # text: topic proportions around a (different, less noisy) view of the latent
    b = rng.standard_normal((LATENT_DIM, TEXT_DIM)) / np.sqrt(LATENT_DIM)
    t_logits = (latent + 0.7 * rng.standard_normal(latent.shape)) @ b * 2.0
    conc = np.exp(t_logits - t_logits.max(1, keepdims=True))
    conc = 0.3 + 12.0 * conc / conc.sum(1, keepdims=True)
    text = np.stack([rng.dirichlet(c) for c in conc]).astype(np.float32)

    splits = np.concatenate([np.full(k, s) for s, k in sizes.items()])
    rng.shuffle(splits)
    rows = [{"id": i, "labels": [int(labels[i])], "split": str(splits[i]),
             "image_features": image[i].tolist(), "text_features": text[i].tolist()} for i in range(n)]
    info = features_demo_info()
    write_dataset(out_dir, info, rows, rows_per_file=rows_per_file)
    return info
