"""The cnn that judges generated digits in the benches: the keras-io MNIST convnet, Kiln's former
`cnn` default. The generative figures and bars in BENCHMARKS.md were judged by this network;
training the judge with these settings keeps new figures comparable with them. Also what the
benches that judge share: their command line's start and a store holding the judge."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

JUDGE = {"filters": "32,64", "convs": "1", "hidden": "0", "dropout": "0.5", "schedule": "constant",
         "learning_rate": "1e-3", "augment": "none"}
EPOCHS = 12  # keras-io's recipe as Kiln ran it (the cnn default's epochs when it was this network)

os.environ.setdefault("KILN_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def parser(doc: str) -> argparse.ArgumentParser:
    """A quiet process and the options every judging bench takes (--store, --epochs)."""
    from kiln import logs

    logs.quiet_process()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None, help="a store to use (and keep); default: a temporary one")
    p.add_argument("--epochs", type=int, default=None)
    return p


def judged_store(given: str | None, prefix: str) -> tuple[Path, Path, Path]:
    """The bench's folder, its store and runs folder; the store gets the judge unless it has a cnn."""
    from kiln import run
    from kiln.store import Store

    root = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    store, runs = root / "store", root / "runs"
    if not Store(store).versions("cnn"):
        run.train(run.plan("cnn", epochs=EPOCHS, store=store, runs_dir=runs, overrides=JUDGE))
    return root, store, runs
