"""The `diffusion` default judged as `cgan` is (`kiln evaluate`: the stored cnn's label accuracy
and confidence over 1,000 samples of each digit, and the Fréchet distance of 5,000 samples to
5,000 test images in the cnn's features), then DDIM's steps against quality and latency.

1. the judge: `kiln train cnn` with the keras-io network (JUDGE, in this process) unless --store
   has a cnn: the network that judged the cgan and dcgan figures in BENCHMARKS.md, so that the
   distances compare with theirs;
2. `kiln train diffusion` (its default, or --epochs / --set), timed, each epoch's seconds
   printed from the run's history;
3. `kiln evaluate diffusion` (label accuracy, confidence, Fréchet distance and its floor);
4. for each of --steps (default 10, 25, 50, 100): the Fréchet distance of --trade-n samples
   (100 of each digit by default: fewer than step 3's 5,000, so these distances sit above it
   and compare only with each other), label accuracy, and the latency of one 16-image request
   (`sample` with its default guidance, in this process, after a warm-up);
5. for each --guidance (default 1, 1.5, 2, 3) at 25 steps: the same figures and confidence.

    .venv/bin/python bench/diffusion_quality.py [--store DIR] [--epochs N] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
from judge import judged_store, parser  # bench/judge.py


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, nargs="*", default=[10, 25, 50, 100])
    p.add_argument("--guidance", type=float, nargs="*", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--trade-n", type=int, default=1000)
    args = p.parse_args()
    from kiln import models, quality, run

    root, store, runs = judged_store(args.store, "kiln-bench-diffusion-")
    try:
        t0 = time.perf_counter()
        v = run.train(run.plan("diffusion", epochs=args.epochs, store=store, runs_dir=runs,
                               overrides=dict(kv.split("=", 1) for kv in args.set)))
        wall = time.perf_counter() - t0
        hist = v.manifest["history"]
        train_s = sum(e["seconds"] for e in hist)
        t0 = time.perf_counter()
        _, metrics = run.evaluate(v.ref, store)
        eval_s = time.perf_counter() - t0

        plugin, model, _ = models.load(v.ref, store)
        judge = quality.classifier_for(plugin, None, store)
        embed, _ = quality.features_of(judge[0], judge[1])
        from kiln import data

        real = np.stack([x.numpy() for x, _ in data.load("mnist", "test", limit=5000).ds]).astype("float32")
        real_f = embed(real)
        per = max(1, args.trade_n // 10)
        rows = []
        for steps in args.steps:
            made = np.concatenate([plugin.infer(model, "sample", {"digit": c, "n": per, "steps": steps, "seed": c})["images"]
                                   for c in range(10)])
            probs = quality._classify(judge[0], judge[1], made)
            acc = float(np.mean(probs.argmax(1) == np.repeat(np.arange(10), per)))
            fid = quality.frechet_distance(embed(made * 255.0), real_f)
            call = {"digit": 7, "n": 16, "steps": steps, "seed": 0}
            plugin.infer(model, "sample", call)
            t = time.perf_counter()
            plugin.infer(model, "sample", call)
            rows.append((steps, fid, acc, time.perf_counter() - t))

        guided = []
        for g in args.guidance:  # 25 steps
            made = np.concatenate([plugin.infer(model, "sample", {"digit": c, "n": per, "guidance": g, "seed": c})["images"]
                                   for c in range(10)])
            probs = quality._classify(judge[0], judge[1], made)
            acc = float(np.mean(probs.argmax(1) == np.repeat(np.arange(10), per)))
            guided.append((g, quality.frechet_distance(embed(made * 255.0), real_f), acc, float(probs.max(1).mean())))

        print(f"diffusion {v.ref} ({plugin.config}), {len(hist)} epochs, {os.cpu_count()} CPUs, "
              f"{model.network.count_params():,} parameters")
        epochs = ", ".join(f"{e['seconds']:.0f}" for e in hist)
        print(f"  training {train_s / 60:.1f} min (epochs: {epochs} s); run with finalize {wall / 60:.1f} min")
        print("  validation loss per epoch: " + ", ".join(f"{e['val_loss']:.4f}" for e in hist))
        print(f"  kiln evaluate ({eval_s / 60:.1f} min): " +
              "  ".join(f"{k}={metrics[k]:.4f}" for k in ("label_accuracy", "label_accuracy_worst_class",
                                                        "confidence", "fid", "fid_floor") if k in metrics))
        print(f"  steps vs quality, {per * 10} samples (the default guidance) and one 16-image request:")
        for steps, fid, acc, latency in rows:
            print(f"    {steps:4d} steps  Frechet {fid:7.2f}  label accuracy {acc:.4f}  16 images {latency:6.2f} s")
        print(f"  guidance vs quality, 25 steps, {per * 10} samples:")
        for g, fid, acc, conf in guided:
            print(f"    guidance {g:4.1f}  Frechet {fid:7.2f}  label accuracy {acc:.4f}  confidence {conf:.4f}")
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
