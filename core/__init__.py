"""Kiln: plugin-based TensorFlow/Keras training and serving on Ray.

The plugin contract lives here; training, the store and the CLI are submodules. Importing kiln
imports neither TensorFlow nor Ray.
"""

__version__ = "0.1.0"

from kiln.plugin import (  # noqa: E402
    DatasetInfo,
    ImageOptions,
    KilnError,
    Method,
    NoConfig,
    Plugin,
    Scalar,
    Tensor,
    config_help,
    inference,
    make_config,
    param,
)

# What a plugin author imports, all from ``kiln``. The picture helpers and the pictures base
# class load on first use (PEP 562), so that importing kiln stays light (no matplotlib).
_LAZY = {"Pictures": "kiln.plugins", "line": "kiln.plugins", "grid": "kiln.images",
         "confusion": "kiln.images", "scatter": "kiln.images", "traces": "kiln.images",
         "curves": "kiln.images", "attention_map": "kiln.images"}

__all__ = ["DatasetInfo", "ImageOptions", "KilnError", "Method", "NoConfig", "Plugin", "Scalar", "Tensor",
           "config_help", "inference", "loss_scaled", "make_config", "param", "replicas", "__version__", *_LAZY]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def loss_scaled(model, optimizer):  # type: ignore[no-untyped-def]
    """``optimizer`` as a hand-written ``train_step`` of ``model`` uses it: under float16
    (``kiln train --precision mixed_float16``) wrapped in Keras' LossScaleOptimizer, so that small
    gradients do not underflow to zero. The step takes its gradients of
    ``optimizer.scale_loss(loss)``, computed inside the tape; applying them unscales them and skips
    a step whose gradients overflowed. Keras wraps a compiled optimizer
    (``model.compile(optimizer=...)``) itself. Under other policies ``optimizer`` is returned as is."""
    import keras

    if model.dtype_policy.name == "mixed_float16" and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def replicas() -> int:
    """Replicas training in sync: divide a hand-written mean loss by it (docs/design.md, "Losses
    under distribution"); 1 outside a distribution strategy."""
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
