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

__all__ = ["DatasetInfo", "ImageOptions", "KilnError", "Method", "NoConfig", "Plugin", "Scalar", "Tensor",
           "config_help", "inference", "make_config", "param", "replicas", "__version__"]


def replicas() -> int:
    """Replicas training in sync: divide a hand-written mean loss by it (docs/design.md, "Losses
    under distribution"); 1 outside a distribution strategy."""
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
