"""Building a plugin and its model, and loading a stored version: the one place for both.

Training (``kiln.trainer``, ``kiln.run``), serving (``kiln.serve``), judging (``kiln.quality``)
and plugins that reuse a stored model (``transfer``) all come here; none of them reaches into the
training orchestrator to load a model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kiln import registry, store as store_mod
from kiln.checkpoint import optimizers
from kiln.plugin import DatasetInfo, KilnError, Plugin, make_config
from kiln.spec import TrainSpec


def plugin_class(manifest: dict[str, Any]) -> type[Plugin]:
    """The registered plugin class a stored version's manifest names."""
    if manifest.get("plugin_path") and not registry.has(manifest["plugin"]):
        registry.load_file(manifest["plugin_path"])
    return registry.get(manifest["plugin"])


def make_plugin(name: str, config: dict[str, Any], info: DatasetInfo, *, store: str | Path | None = None,
                plugin_path: str | None = None, recorded: dict[str, Any] | None = None) -> Plugin:
    """The registered plugin ``name`` with ``config`` (overrides, or a stored config), set up for
    the data ``info`` describes; KilnError if the plugin is unknown or rejects the config or data.
    ``recorded``: a run's whole config as it started, under ``config``; a key the plugin no
    longer has is dropped."""
    if plugin_path and not registry.has(name):
        registry.load_file(plugin_path)
    cls = registry.get(name)
    if recorded:
        known = {f.name for f in dataclasses.fields(cls.Config)}
        config = {**{k: v for k, v in recorded.items() if k in known}, **config}
    plugin = cls(make_config(cls.Config, config))
    plugin.store = None if store is None else str(store)
    plugin.setup(info)
    return plugin


def for_spec(spec: TrainSpec, info: DatasetInfo) -> Plugin:
    """The plugin a training run (or a search's trial) trains, set up for its data."""
    return make_plugin(spec.plugin, spec.overrides, info, store=spec.store, plugin_path=spec.plugin_path,
                       recorded=spec.config)


def build(plugin: Plugin, precision: str = "float32") -> Any:
    """Build and compile the plugin's model and create its optimizer state (call under a scope).

    ``precision`` is Keras' dtype policy for the layers built here (``kiln train --precision``):
    set for the build only, since a layer keeps the policy it was made under and a process may
    build more models after this one. Its variables stay float32 under every policy, so a model
    trained in mixed precision loads into a float32 one (what serving and judging build); each
    plugin keeps its outputs float32 (``dtype="float32"`` on its last layers), as Keras' mixed
    precision guide asks, and compile() adds loss scaling under mixed_float16."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        model = plugin.build()
    finally:
        keras.config.set_dtype_policy(before)
    if not model.built:
        # keras-io style GANs/VAEs have no call(): their sub-models (already built) own every
        # variable, so the model is complete; Keras only needs to be told before save_weights.
        model.built = True
    for opt in optimizers(model):
        if not opt.built:  # a GAN's compile() builds each optimizer on its own sub-model
            opt.build(model.trainable_variables)
    return model


def load(ref: str, store: str | Path | None = None) -> tuple[Plugin, Any, store_mod.Version]:
    """Rebuild a stored model through the registry from its manifest and load its weights.

    Only weights are read from disk (no code or layer config is deserialised), so a stored model
    cannot run arbitrary code; the plugin's own build() defines the architecture.
    """
    found = store_mod.Store(store)
    version = found.get(ref)
    m = version.manifest
    try:
        config = {**plugin_class(m).stored_defaults, **m["config"]}
        plugin = make_plugin(m["plugin"], config, DatasetInfo.from_dict(m["dataset"]),
                             store=found.spec, plugin_path=m.get("plugin_path"))
    except (KeyError, TypeError) as e:
        raise KilnError(f"corrupt manifest {version.path / store_mod.MANIFEST}: {e}") from None
    model = build(plugin)
    model.load_weights(version.weights)
    plugin.load_assets(version.assets)
    return plugin, model, version
