"""Confidence against coverage for the `dcgan` default when its noise is drawn nearer the mean
(z ~ t * N(0, I), BigGAN's truncation trick, through the generator directly), judged as `kiln
evaluate dcgan` judges: the keras-io cnn's mean confidence and class coverage over 10,000 samples, and the Fréchet distance
of 5,000 samples to 5,000 test images in that cnn's features.

1. the judge: `kiln train cnn` with the keras-io network (bench/judge.py) unless --store has one;
2. `kiln train dcgan` (its default, or --epochs) unless --store has one, timed;
3. for each --scale t: the three figures, side by side in this run.

    .venv/bin/python bench/dcgan_truncation.py [--store DIR] [--epochs N] [--scale 1 0.9 0.8 0.7]
"""

from __future__ import annotations

import math
import time

import numpy as np
from judge import judged_store, parser  # bench/judge.py


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--scale", type=float, nargs="*", default=[1.0, 0.9, 0.8, 0.7, 0.6])
    args = p.parse_args()
    from kiln import data, models, quality, run
    from kiln.plugins.dcgan import latent, to_unit
    from kiln.store import Store

    _, store, runs = judged_store(args.store, "kiln-bench-dcgan-")
    if not Store(store).versions("dcgan"):
        t0 = time.perf_counter()
        run.train(run.plan("dcgan", epochs=args.epochs, store=store, runs_dir=runs))
        print(f"dcgan trained in {time.perf_counter() - t0:.0f} s")
    plugin, model, version = models.load("dcgan", store)
    judge_plugin, judge_model, ref = quality.classifier_for(plugin, None, store)
    print(f"dcgan {version.ref}, judged by {ref}; stored figures: {version.manifest['metrics']}")
    embed, what = quality.features_of(judge_plugin, judge_model)
    print(f"Fréchet distances in {what}")
    real = np.stack([x.numpy() for x, _ in data.load("mnist", "test", limit=5000).ds]).astype("float32")
    real_f = embed(real)
    k = judge_plugin.info.num_classes

    def draw(n: int, scale: float) -> np.ndarray:  # in chunks, as kiln.quality samples
        return np.concatenate([to_unit(model.generate(latent(min(500, n - i), plugin.config.latent_dim, i) * scale))
                               for i in range(0, n, 500)])

    print("\n| z scale | confidence | coverage | Fréchet distance |\n|---|---|---|---|")
    for scale in args.scale:
        images = draw(10_000, scale)
        x = images.reshape(-1, 28, 28, 1) * 255.0
        probs = np.concatenate([np.asarray(judge_plugin.infer(judge_model, "classify", {"images": x[i:i + 500]})["probabilities"])
                                for i in range(0, len(x), 500)])
        hist = np.bincount(probs.argmax(axis=1), minlength=k) / len(probs)
        coverage = float(-np.sum(hist[hist > 0] * np.log(hist[hist > 0]))) / math.log(k)
        fid = quality.frechet_distance(embed(images[:5000].reshape(-1, 28, 28) * 255.0), real_f)
        print(f"| {scale:g} | {probs.max(axis=1).mean():.4f} | {coverage:.4f} | {fid:.1f} |", flush=True)


if __name__ == "__main__":
    main()
