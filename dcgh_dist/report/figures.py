"""The report's figures, each returned as PNG bytes (matplotlib's Agg canvas on a bare Figure:
no pyplot, so the global backend and pyplot's figure registry are left alone)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from dcgh_dist.codes import binarize

# Distinct hues, so that every line can be told apart (and found again by tests/plots.py).
PALETTE = ("tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:green", "tab:cyan", "tab:pink",
           "tab:brown", "tab:olive")
DIRECTION_TITLES = {"i2t": "image → text", "t2i": "text → image"}


@dataclass(frozen=True)
class Style:
    color: str
    linestyle: str = "-"


def series_styles(labels: Sequence[str], kinds: Mapping[str, str]) -> dict[str, Style]:
    """A colour per series (in order) and a line style per kind: methods solid, the untrained
    model dashed, the linear baseline dash-dotted."""
    dash = {"method": "-", "untrained": "--", "linear": "-."}
    return {label: Style(PALETTE[i % len(PALETTE)], dash.get(kinds.get(label, "method"), "-"))
            for i, label in enumerate(labels)}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curves_figure(series: Mapping[str, Mapping], styles: Mapping[str, Style], title: str) -> bytes:
    """Precision-recall over Hamming radius (top) and precision@N (bottom), image→text left and
    text→image right; a line per series. ``series[label]`` holds ``pr[task]`` (a
    ``metrics.pr_curve_hamming`` result), ``pn[task]`` (precisions) and ``ns``."""
    fig = _figure(11.0, 8.2)
    axes = fig.subplots(2, 2)
    for col, task in enumerate(("i2t", "t2i")):
        ax_pr, ax_pn = axes[0][col], axes[1][col]
        for label, s in series.items():
            st = styles[label]
            pr = s["pr"][task]
            rec, prec = np.asarray(pr["recall"], float), np.asarray(pr["precision"], float)
            ok = np.isfinite(rec) & np.isfinite(prec)
            ax_pr.plot(rec[ok], prec[ok], color=st.color, linestyle=st.linestyle, marker=".", linewidth=1.6,
                       label=label)
            ax_pn.plot(s["ns"], s["pn"][task], color=st.color, linestyle=st.linestyle, linewidth=1.6, label=label)
        ax_pr.set(title=f"PR over Hamming radius, {DIRECTION_TITLES[task]}", xlabel="recall", ylabel="precision",
                  xlim=(0.0, 1.0), ylim=(0.0, 1.02))
        ax_pn.set(title=f"precision@N, {DIRECTION_TITLES[task]}", xlabel="N (top-ranked items)",
                  ylabel="precision", ylim=(0.0, 1.02))
        for ax in (ax_pr, ax_pn):
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def tsne_embedding(image_codes: np.ndarray, text_codes: np.ndarray, seed: int = 0) -> np.ndarray:
    """One 2-D t-SNE of the image and the text codes together (rows: images, then texts), so
    that a text lies near the images of its class when the hashing aligns the modalities.
    On ±1 codes the Euclidean distance is 2·sqrt(Hamming), so neighbours are Hamming neighbours."""
    from sklearn.manifold import TSNE

    x = np.vstack([binarize(image_codes), binarize(text_codes)]).astype(np.float32) * 2.0 - 1.0
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


def tsne_figure(embedding: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """Image codes left, text codes right (the same embedding), coloured by ``labels`` (each
    row's first label)."""
    from matplotlib import colormaps

    n = len(labels)
    num_classes = max(len(class_names), int(labels.max()) + 1 if n else 1)
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "nipy_spectral"]
    colors = cmap(labels % cmap.N if num_classes <= 20 else labels / max(num_classes - 1, 1))
    fig = _figure(11.0, 5.4)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, part, name in ((axes[0], slice(0, n), "image codes"), (axes[1], slice(n, 2 * n), "text codes")):
        ax.scatter(embedding[part, 0], embedding[part, 1], c=colors, s=7, linewidths=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if num_classes <= 20:
        from matplotlib.lines import Line2D

        present = sorted(set(int(v) for v in labels))
        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(c % cmap.N),
                          label=(class_names[c] if c < len(class_names) else str(c))[:24]) for c in present]
        axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def training_figure(history: Sequence[Mapping], selected_epoch: int | None, title: str) -> bytes:
    """val mAP (left) and total loss (right) per epoch; the selected (exported) epoch marked."""
    fig = _figure(10.0, 4.2)
    ax_map, ax_loss = fig.subplots(1, 2)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]

    def values(key: str) -> list[float]:
        return [float(h[key]) if isinstance(h.get(key), (int, float)) else float("nan") for h in history]

    ax_map.plot(epochs, values("val_map"), color="tab:blue", marker="o", label="val mAP (mean)")
    for key, color, name in (("val_map_i2t", "tab:purple", "i→t"), ("val_map_t2i", "tab:cyan", "t→i")):
        if any(key in h for h in history):
            ax_map.plot(epochs, values(key), color=color, linestyle="--", linewidth=1.0, label=f"val mAP {name}")
    ax_loss.plot(epochs, values("loss_total"), color="tab:red", marker="o", label="total loss")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_map, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if selected_epoch:
            ax.axvline(selected_epoch, color="tab:green", linestyle=":", label=f"selected (epoch {selected_epoch})")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    ax_map.set_ylabel("val mAP")
    ax_loss.set_ylabel("loss")
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def loss_figure(history: Sequence[Mapping], best_epoch: int | None) -> bytes:
    """A run's loss terms per epoch with val mAP on a second axis; the best val epoch (the exported
    checkpoint) and, where early stopping ended the run, the last epoch marked."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    epochs = [h["epoch"] for h in history]
    terms = [k for k in history[0] if k.startswith("loss_") and k != "loss_pairwise_pos"]
    for k in sorted(terms, key=lambda k: k != "loss_total"):
        ax.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=k.removeprefix("loss_"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if "val_map" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_map", float("nan")) for h in history], "k--", label="val mAP")
        if best_epoch:
            ax2.axvline(best_epoch, color="tab:green", linestyle=":", label=f"best val (epoch {best_epoch})")
        if history[-1].get("stopped_early"):
            ax2.axvline(epochs[-1], color="tab:red", linestyle=":", label=f"stopped (epoch {epochs[-1]})")
        ax2.set_ylabel("val mAP")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
