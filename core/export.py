"""``kiln export``: a stored model's network in the formats other servers read.

The network is the plugin's ``export_model`` (raw inputs of its predict method in, that method's
main output out, preprocessing included), written with Keras 3's own ``model.export``:

- ``saved_model``: TF Serving's layout, ``OUT/NAME/VERSION/saved_model.pb`` with a
  ``serving_default`` signature (TF Serving serves ``OUT/NAME`` as is);
- ``onnx``: ``OUT/NAME-VERSION.onnx`` (Keras converts through tf2onnx);
- ``litert``: ``OUT/NAME-VERSION.tflite`` (TensorFlow's LiteRT converter).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kiln import models
from kiln.plugin import KilnError

FORMATS = {"saved_model": "tf_saved_model", "onnx": "onnx", "litert": "litert"}
NEEDS = {"onnx": ("tf2onnx", "onnx"), "litert": ()}


def target(out: Path, name: str, version: int, fmt: str) -> Path:
    """Where ``fmt`` is written for a version."""
    if fmt == "saved_model":
        return out / name / str(version)
    return out / f"{name}-{version}.{'onnx' if fmt == 'onnx' else 'tflite'}"


def export(ref: str, fmt: str, out: str | Path, store: str | Path | None = None) -> Path:
    """Export stored model ``ref`` as ``fmt`` under ``out``; the path written. Nothing is left
    behind on failure, and an existing export is never overwritten."""
    if fmt not in FORMATS:
        raise KilnError(f"--format takes {', '.join(FORMATS)}, got {fmt!r}")
    for module in NEEDS.get(fmt, ()):
        try:
            __import__(module)
        except ImportError:
            raise KilnError(f"--format {fmt} needs the {module} package: pip install 'kiln[export]'") from None
    plugin, model, version = models.load(ref, store)
    network = plugin.export_model(model)
    # the ONNX path reads the input signature off a model that has run once: run it on one
    # example of zeros (dtype and shape from its inputs)
    import numpy as np

    dummy = [np.zeros((1, *i.shape[1:]), dtype=i.dtype) for i in network.inputs]
    network(dummy if len(dummy) > 1 else dummy[0])
    dest = target(Path(out), version.name, version.version, fmt)
    if dest.exists():
        raise KilnError(f"{dest} already exists; remove it or export to another --out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # written next to its destination and renamed into place: a failed export leaves nothing
    tmp = Path(tempfile.mkdtemp(prefix=".kiln-export-", dir=dest.parent))
    try:
        written = tmp / ("model" if fmt == "saved_model" else dest.name)
        try:
            network.export(str(written), format=FORMATS[fmt], verbose=False)
        except (ValueError, TypeError, NotImplementedError, ImportError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise KilnError(f"{version.ref} cannot be exported as {fmt}: {first}") from None
        written.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
