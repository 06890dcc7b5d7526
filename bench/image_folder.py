"""A folder of real photos (the hymenoptera ants/bees set: 245 training photos, 153 for test),
side by side in one run:

1. preparing the folder once (decoding and resizing every photo into Kiln's cache) against
   reading the prepared folder again (a new process's first read);
2. `cnn` from scratch at 64 px, without augmentation and with random flips, shifts and
   rotations (`--set augment=flip,crop,rotate`), same seed, epochs and batch size: test
   accuracy on the 153 val photos;
3. with ``--generative N``: the denoising autoencoder and the VAE, N epochs each on the same
   photos, their test figures, and their pictures copied to ``--pictures DIR``.

    .venv/bin/python bench/image_folder.py [--epochs 40] [--size 64] [--generative 30 --pictures DIR]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
READ = ("import time, sys; from kiln import data; t = time.perf_counter(); "
        "info = data.prepare(sys.argv[1]); print(time.perf_counter() - t, info.train_size, info.test_size)")


def timed_read(key: str, env: dict) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", READ, key], env=env, capture_output=True, text=True, check=True)
    seconds, train, test = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(train), int(test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--folder", default=str(FOLDER))
    p.add_argument("--seeds", default="0,1,2", help="one pair of runs per seed")
    p.add_argument("--generative", type=int, default=0, help="epochs of the autoencoder and the VAE (0: skip)")
    p.add_argument("--pictures", default=None, help="copy the generative models' pictures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-images-"))
    env = {**os.environ, "KILN_CACHE": str(work / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    from kiln import data

    key = data.image_key(args.folder, args.size, None)
    first = timed_read(key, env)
    again = timed_read(key, env)
    print(f"prepare once: {first[0]:.2f} s for {first[1] + first[2]} photos; read again: {again[0]:.3f} s "
          f"({first[0] / again[0]:.0f}x faster)", flush=True)
    os.environ["KILN_CACHE"] = env["KILN_CACHE"]
    from kiln import run

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for augment in ("none", "flip,crop,rotate"):  # side by side, per seed
            t0 = time.perf_counter()
            spec = run.plan("cnn", dataset=args.folder, epochs=args.epochs, batch_size=32, seed=seed,
                            overrides={"image_size": str(args.size), "augment": augment},
                            store=work / "store", runs_dir=work / "runs", val_fraction=0.0)
            version = run.train(spec)
            rows.append((seed, augment, version.manifest["metrics"]["accuracy"], time.perf_counter() - t0))
    print("\n| seed | augment | epochs | test accuracy (153 photos) | train time (s) |\n|---|---|---|---|---|")
    for seed, augment, acc, seconds in rows:
        print(f"| {seed} | {augment} | {args.epochs} | {acc:.4f} | {seconds:.0f} |")
    for augment in ("none", "flip,crop,rotate"):
        accs = [a for _, aug, a, _ in rows if aug == augment]
        print(f"{augment}: mean test accuracy {sum(accs) / len(accs):.4f} over {len(accs)} seeds")
    if args.generative:
        import shutil

        for plugin in ("autoencoder", "vae"):
            t0 = time.perf_counter()
            spec = run.plan(plugin, dataset=args.folder, epochs=args.generative, batch_size=32, seed=0,
                            overrides={"image_size": str(args.size)}, store=work / "store",
                            runs_dir=work / "runs", val_fraction=0.0)
            version = run.train(spec)
            figures = "  ".join(f"{k}={v:.4f}" for k, v in version.manifest["metrics"].items())
            print(f"{plugin}: {args.generative} epochs in {time.perf_counter() - t0:.0f} s: {figures}")
            if args.pictures:
                out = Path(args.pictures)
                out.mkdir(parents=True, exist_ok=True)
                for png in (version.path / "artifacts").glob("*.png"):
                    shutil.copy(png, out / f"{plugin}-{png.name}")


if __name__ == "__main__":
    main()
