"""Pictures for people: image grids written as PNG with matplotlib (no hand-written encoders)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def grid(images: np.ndarray, path: Path, *, cols: int = 8, titles: Sequence[str] | None = None,
         colors: Sequence[str] | None = None, title: str | None = None, cell: float = 1.1) -> Path:
    """Write images (N, H, W[, C]) with values in [0, 1] as a grid PNG; optional per-image titles.

    The images are tiled into one array drawn on one Axes: an Axes per image (and tight_layout
    over them) made every grid many times slower (bench/pictures.py), and every training run
    draws some, GANs and diffusion one after each epoch."""
    plt = _plt()
    images = _images(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    band = int(round(h * 0.4)) if titles is not None else 0  # room for each picture's title
    gap = max(1, h // 10)
    sheet = tile(images, cols, gap=gap, band=band, background=1.0)
    head = 0.4 if title else 0.0
    width = cols * cell
    fig = plt.figure(figsize=(width, width * sheet.shape[0] / sheet.shape[1] + head))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - head / fig.get_figheight()))
    ax.imshow(sheet, interpolation="nearest", aspect="auto")
    ax.axis("off")
    if titles is not None:
        for i in range(min(n, len(titles))):
            r, k = divmod(i, cols)
            ax.text(gap + k * (w + gap) + w / 2, gap + r * (band + h + gap) + band / 2, titles[i],
                    ha="center", va="center", fontsize=8, color=colors[i] if colors else "black")
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.05 / fig.get_figheight(), va="top")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """Write a confusion matrix (rows: true class, columns: predicted) as a PNG heat map."""
    plt = _plt()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.55 * k))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def attention_map(weights: np.ndarray, chars: Sequence[str], path: Path, title: str = "") -> Path:
    """Write attention weights (query, key) over a line of characters as a PNG heat map: row i
    is how much character i attends to each character before it."""
    plt = _plt()
    shown = [{"\n": "\u21b5", " ": "\u2423"}.get(c, c) for c in chars]
    k = len(shown)
    fig, ax = plt.subplots(figsize=(1.5 + 0.16 * k, 1.2 + 0.16 * k))
    ax.imshow(weights, cmap="viridis", vmin=0)
    ax.set_xticks(range(k), shown, fontsize=6, fontfamily="monospace")
    ax.set_yticks(range(k), shown, fontsize=6, fontfamily="monospace")
    ax.set_xlabel("attends to (key)")
    ax.set_ylabel("character (query)")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def scatter(points: np.ndarray, labels: np.ndarray, path: Path, title: str = "") -> Path:
    """Write 2-D points coloured by integer label (e.g. a latent space) as a PNG with a legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
    fig.colorbar(sc, ax=ax, ticks=range(int(labels.max()) + 1 if len(labels) else 1), label="class")
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def traces(windows: np.ndarray, channels: Sequence[str], path: Path, *, titles: Sequence[str],
           colors: Sequence[str] | None = None, rate_hz: float = 50.0, title: str = "") -> Path:
    """Write sensor windows (N, steps, channels) as one small line plot per window (one line per
    channel, x axis in seconds), e.g. test windows with their predicted activity."""
    plt = _plt()
    n, cols = len(windows), min(4, len(windows))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    t = np.arange(windows.shape[1]) / rate_hz
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        for c, name in enumerate(channels):
            ax.plot(t, windows[i, :, c], lw=0.8, label=name)
        ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
        ax.tick_params(labelsize=6)
        ax.set_xlabel("s", fontsize=7)
    axes.flat[0].legend(fontsize=5, ncol=2, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _images(images: np.ndarray) -> np.ndarray:
    images = np.clip(np.asarray(images, dtype="float32"), 0, 1)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or not len(images):
        raise ValueError(f"expected images (N, H, W[, C]), got shape {list(images.shape)}")
    return images


def tile(images: np.ndarray, cols: int, *, gap: int = 2, band: int = 0, background: float = 0.0) -> np.ndarray:
    """Images (N, H, W, C) as one array: ``cols`` to a row, ``gap`` pixels around each and a band
    of ``band`` pixels above each (for a title), the rest ``background``."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    sheet = np.full((rows * (band + h + gap) + gap, cols * (w + gap) + gap, c), background, dtype="float32")
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = gap + r * (band + h + gap) + band, gap + k * (w + gap)
        sheet[y:y + h, x:x + w] = images[i]
    return sheet


def png_grid(images: np.ndarray, cols: int = 8, scale: int = 2) -> bytes:
    """Images (N, H, W[, C]) with values in [0, 1] tiled into one PNG (bytes), for HTTP replies."""
    import io

    from PIL import Image

    images = _images(images)
    sheet = tile(images, min(cols, len(images)))
    pixels = (sheet * 255).round().astype("uint8")
    img = Image.fromarray(pixels[..., 0] if sheet.shape[-1] == 1 else pixels)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# A decoded picture this large would take gigabytes before any model saw it; the header is read
# first, so the check costs nothing (a 12 KB PNG can declare 3000x3000 pixels).
MAX_PIXELS = 4096 * 4096


def decode(data: bytes, shape: Sequence[int | None], *, source: str = "image",
           max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An encoded picture (PNG, JPEG, GIF, BMP...) as pixel values 0-255 in a model's input shape
    ``(None, H, W[, C])``: converted to the channels it declares (1: grayscale, 3: RGB) and resized
    to H x W. The one decoder of the CLI (``kiln predict --image``) and the server (``{"b64": ...}``).
    KilnError names ``source`` when the bytes are not a picture or are too large to decode."""
    import io

    from PIL import Image

    from kiln.plugin import KilnError

    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - whatever PIL says, the input is not a picture
        raise KilnError(f"{source} is not a PNG, JPEG, GIF or BMP picture: {e}") from None
    w0, h0 = img.size
    if w0 * h0 > max_pixels:
        raise KilnError(f"{source} is {w0}x{h0} pixels, over the limit of {max_pixels} pixels; "
                        f"send it at most at the model's size")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise KilnError(f"{source} cannot be decoded: {e}") from None
    h, w = int(shape[1] or h0), int(shape[2] or w0)
    channels = shape[3] if len(shape) > 3 else None
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (w, h):
        img = img.resize((w, h))
    x = np.asarray(img, dtype="float32")
    if len(shape) > 3 and x.ndim == 2:
        x = x[..., None]
    return x


def curves(series: dict[str, list[tuple[int, float]]], path: Path, *, ylabel: str, title: str = "") -> Path:
    """Lines of (epoch, value) per name in one chart (``kiln runs compare``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def params(points: Sequence[tuple[dict, float]], dims: Sequence[tuple[str, str]], path: Path, *,
           ylabel: str, mode: str = "max") -> Path:
    """A search's result against each searched parameter: one panel per (key, kind), a point per
    trial (``kiln tune``). Log x for loguniform; options side by side for choice and grid."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(dims), figsize=(3.6 * len(dims) + 0.6, 3.4), squeeze=False)
    ys = [y for _, y in points]
    best = (max if mode == "max" else min)(range(len(ys)), key=ys.__getitem__) if ys else None
    for ax, (key, kind) in zip(axes[0], dims):
        xs = [c[key] for c, _ in points]
        if kind in ("choice", "grid"):
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20)
        elif kind == "loguniform":
            ax.set_xscale("log")
        ax.scatter(xs, ys, s=22, alpha=0.8)
        if best is not None:
            ax.scatter([xs[best]], [ys[best]], s=70, facecolors="none", edgecolors="red", label="best")
            ax.legend(fontsize=7)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, path)
