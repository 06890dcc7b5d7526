"""What a grid picture costs: Kiln's grid (kiln.images.grid: the images tiled into one array on one
Axes) beside an Axes per image with tight_layout over them (the way it was drawn before), side by
side in one process, alternating, REPEATS times each, on MNIST test digits: 64 pictures (a GAN's
samples), 64 with a coloured title each (the cnn's predictions) and 100 in rows of 10 (a class
grid). Every training run draws some; GANs and diffusion draw one after each epoch.

    python bench/pictures.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def per_axes(images, path, *, cols=8, titles=None, colors=None, title=None, cell=1.1):  # type: ignore[no-untyped-def]
    from kiln.images import _plt

    plt = _plt()
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(images[i], 0, 1), cmap="gray", vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from kiln import data, images

    x = np.stack([im.numpy() for im, _ in data.load("mnist", "test", limit=100).ds])[..., 0] / 255.0
    names = [str(i % 10) for i in range(64)]
    cases = {"64 pictures": (x[:64], {"title": "samples (seed 0)"}),
             "64 with titles": (x[:64], {"titles": names, "colors": ["green"] * 60 + ["red"] * 4}),
             "100 in rows of 10": (x, {"cols": 10, "title": "one row per class"})}
    ways = {"an Axes each": per_axes, "Kiln's grid": images.grid}
    out = Path(tempfile.mkdtemp())
    images.grid(x[:8], out / "warm.png")
    per_axes(x[:8], out / "warm.png")
    print("| picture | drawn with | seconds, median | vs an Axes each |\n| --- | --- | --- | --- |")
    for case, (pictures, kw) in cases.items():
        seen: dict[str, list[float]] = {way: [] for way in ways}
        for i in range(a.repeats):
            for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
                t0 = time.perf_counter()
                ways[way](pictures, out / "grid.png", **kw)
                seen[way].append(time.perf_counter() - t0)
        base = statistics.median(seen["an Axes each"])
        for way, times in seen.items():
            print(f"| {case} | {way} | {statistics.median(times):.3f} | {statistics.median(times) / base:.2f} |")


if __name__ == "__main__":
    main()
