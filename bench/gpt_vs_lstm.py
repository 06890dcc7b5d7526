"""The `gpt` default against the `lstm` default on tiny Shakespeare, on this machine, in one run.

1. `lstm`: two epochs of its default (the same data, vocabulary and split), timed per epoch; its
   default's wall time is estimated as the first epoch (tracing included) plus 29 times the
   second (the default trains 30 epochs; a whole run takes about 40 minutes alone on 2 cores).
2. `gpt`: its whole default run, in this process; its test-split nats/char (nanoGPT's validation
   split, the figure `lstm`'s 1.509 is), the epoch at which its validation loss first reached
   the goal, wall time, parameters, training characters/s.
3. Generation: characters/s of each model's `generate` (400 characters, temperature 0.8, the
   same seed), the compiled loop each plugin uses, after one warm-up call; and gpt's simple
   alternative, a `predict_on_batch` over the text so far for each character.

    .venv/bin/python bench/gpt_vs_lstm.py [--gpt-epochs N] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KILN_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))

GOAL = 1.509  # the lstm default's test nats/char (BENCHMARKS.md)


def gen_rate(ref: str, store: Path) -> float:
    from kiln import models

    plugin, model, _ = models.load(ref, store)
    args = {"prompt": "ROMEO:", "max_chars": 400, "temperature": 0.8, "seed": 0}
    plugin.infer(model, "generate", args)
    t0 = time.perf_counter()
    plugin.infer(model, "generate", args)
    return 400 / (time.perf_counter() - t0)


def naive_rate(ref: str, store: Path, n: int = 100) -> float:
    """The simple loop the compiled one replaces: a predict_on_batch over the text so far (its
    last context characters) per character, sampled in NumPy."""
    import numpy as np

    from kiln import models

    plugin, model, _ = models.load(ref, store)
    rng = np.random.default_rng(0)
    ids = list(plugin.encode("ROMEO:", "prompt"))
    model.predict_on_batch(np.array([ids[-plugin.context:]], "int32"))
    t0 = time.perf_counter()
    for _ in range(n):
        logits = np.asarray(model.predict_on_batch(np.array([ids[-plugin.context:]], "int32")))[0, -1] / 0.8
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return n / (time.perf_counter() - t0)


def main() -> None:
    from kiln import logs

    logs.quiet_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt-epochs", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-lstm", action="store_true")
    args = p.parse_args()
    from kiln import models, run

    root = Path(tempfile.mkdtemp(prefix="kiln-bench-gpt-"))
    try:
        store, runs = root / "store", root / "runs"
        lstm_est = None
        if not args.skip_lstm:
            v = run.train(run.plan("lstm", epochs=2, store=store, runs_dir=runs))
            h = v.manifest["history"]
            lstm_est = h[0]["seconds"] + 29 * h[1]["seconds"]
            lstm_chars = v.manifest["dataset"]["extra"]["train_chars"] * 0.9 / h[1]["seconds"]
        overrides = dict(kv.split("=", 1) for kv in args.set)
        t0 = time.perf_counter()
        g = run.train(run.plan("gpt", epochs=args.gpt_epochs, store=store, runs_dir=runs, overrides=overrides))
        wall = time.perf_counter() - t0
        m = g.manifest
        nats = m["metrics"]["nats_per_char"]
        plugin, model, _ = models.load(g.ref, store)
        params = model.count_params()
        hist = m["history"]
        reached = next((e["epoch"] for e in hist if e.get("val_loss", 9) <= GOAL), None)
        steady = sorted(e["seconds"] for e in hist)[len(hist) // 2]
        chars = m["dataset"]["extra"]["train_chars"] * 0.9 / steady  # 90%: the rest is validation

        print(f"gpt default ({plugin.config}), {len(hist)} epochs, {os.cpu_count()} CPUs")
        print(f"  test nats/char {nats:.3f}  bits/char {nats / math.log(2):.3f}  (goal <= {GOAL})")
        curve = ", ".join(f"{e['val_loss']:.3f}" for e in hist)
        print(f"  validation loss per epoch: {curve}")
        print(f"  validation first <= {GOAL}: " + (f"epoch {reached}" if reached else "never"))
        print(f"  parameters {params:,}  wall {wall / 60:.1f} min  training {chars:,.0f} characters/s")
        if lstm_est is not None:
            print(f"  lstm default on this machine: {lstm_est / 60:.1f} min estimated (2 epochs timed), "
                  f"training {lstm_chars:,.0f} characters/s; gpt/lstm wall {wall / lstm_est:.2f}x")
        print(f"  generate, 400 characters: gpt {gen_rate(g.ref, store):,.0f} characters/s" +
              ("" if args.skip_lstm else f", lstm {gen_rate('lstm', store):,.0f} characters/s") +
              f"; gpt as a predict_on_batch per character: {naive_rate(g.ref, store):,.0f} characters/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
