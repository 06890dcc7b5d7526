"""The plugin contract: what one model family declares so that Kiln can train, store and serve it.

A plugin file (see ``plugins/cnn.py``) holds a typed config dataclass, the Keras model and one
``Plugin`` subclass. Kiln never imports a plugin's model code except through this contract.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from kiln.values import not_a_number


class KilnError(Exception):
    """An error the user can fix; its message says what was wrong and how to fix it."""


# --------------------------------------------------------------------------- config


def param(default: Any, *, help: str = "", min: float | None = None, max: float | None = None,
          choices: tuple | None = None) -> Any:
    """A config field with a default, an optional range or set of choices, and a help line."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NoConfig:
    """Config of a plugin without hyperparameters."""


@dataclass
class ImageOptions:
    """How an image folder is read for a plugin (kiln.data, "image folders"): a plugin that
    models pictures inherits these fields in its Config. tfds and .npz images keep their shape."""

    image_size: int = param(64, min=8, max=512, help="image folders: the side pictures are resized to")
    channels: str = param("auto", choices=("auto", "rgb", "grayscale"),
                          help="image folders: auto is RGB if any picture has colour")
    skip_broken: bool = param(False, help="image folders: skip (and count) pictures that do not decode")

    def image_channels(self) -> int | None:
        return {"rgb": 3, "grayscale": 1}.get(self.channels)


def _describe(name: str, ftype: Any, meta: dict) -> str:
    kind = getattr(ftype, "__name__", str(ftype))
    if typing.get_origin(ftype) is tuple:
        kind = "comma-separated " + typing.get_args(ftype)[0].__name__ + "s"
    parts = [kind]
    if meta.get("choices"):
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    if meta.get("min") is not None:
        parts.append(f">= {meta['min']}")
    if meta.get("max") is not None:
        parts.append(f"<= {meta['max']}")
    return f"{name}: " + ", ".join(parts)


def _coerce(value: Any, ftype: Any, name: str, meta: dict) -> Any:
    def fail() -> KilnError:
        return KilnError(f"bad value {value!r} for config key '{name}': expected "
                         + _describe(name, ftype, meta).split(": ", 1)[1])

    origin = typing.get_origin(ftype)
    if origin is tuple:
        item = typing.get_args(ftype)[0]
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            out = tuple(_coerce(v.strip() if isinstance(v, str) else v, item, name, {}) for v in items)
        except KilnError:
            raise fail() from None
        if not out:
            raise fail()
        for v in out:
            _check_range(v, name, ftype, meta)
        return out
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise fail()
    if ftype is int:
        if isinstance(value, bool):
            raise fail()
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise fail()
    elif ftype is float:
        if isinstance(value, bool):
            raise fail()
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise fail() from None
        if not math.isfinite(out):
            raise fail()
    elif ftype is str:
        out = str(value)
    else:
        raise KilnError(f"config key '{name}' has unsupported type {ftype!r} (plugin bug)")
    _check_range(out, name, ftype, meta)
    return out


def _check_range(v: Any, name: str, ftype: Any, meta: dict) -> None:
    bad = (meta.get("choices") and v not in meta["choices"]) or \
          (meta.get("min") is not None and v < meta["min"]) or \
          (meta.get("max") is not None and v > meta["max"])
    if bad:
        raise KilnError(f"bad value {v!r} for config key '{name}': expected "
                        + _describe(name, ftype, meta).split(": ", 1)[1])


def make_config(config_cls: type, overrides: dict[str, Any] | None = None) -> Any:
    """Build a plugin config from its defaults and ``overrides`` (strings from ``--set`` or values).

    Unknown keys and bad values raise ``KilnError`` naming the key and what is allowed.
    """
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "(none: this plugin has no config)"
            raise KilnError(f"unknown config key '{key}'; allowed keys: {allowed}")
        values[key] = _coerce(raw, hints[key], key, dict(fields[key].metadata))
    config = config_cls(**values)
    check = getattr(config, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise KilnError(f"invalid config: {e}") from None
    return config


def config_help(config_cls: type) -> list[str]:
    """One line per config key: name, type/range and default."""
    hints = typing.get_type_hints(config_cls)
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        desc = _describe(f.name, hints[f.name], dict(f.metadata))
        helptext = f.metadata.get("help", "")
        lines.append(f"{desc} (default {default!r}){' - ' + helptext if helptext else ''}")
    return lines


# --------------------------------------------------------------------------- data description


@dataclass
class DatasetInfo:
    """What a model needs to know about its data; stored in the manifest so serving needs no data."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    train_size: int = 0
    test_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetInfo":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


# --------------------------------------------------------------------------- inference schemas


@dataclass(frozen=True)
class Tensor:
    """An array input or output. ``shape`` entries: an int, None (any size) or "input" (the
    dataset's input shape, spliced in). Values outside [min, max] or non-finite are rejected."""

    shape: tuple = (None, "input")
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None
    description: str = ""
    optional: bool = False  # None (absent) is then passed through to the method

    def resolve(self, info: DatasetInfo) -> list[int | None]:
        out: list[int | None] = []
        for s in self.shape:
            out.extend(info.input_shape if s == "input" else [s])
        return out

    def validate(self, name: str, value: Any, info: DatasetInfo) -> np.ndarray | None:
        if value is None:
            if self.optional:
                return None
            raise KilnError(f"missing required argument '{name}' (an array of shape {self.resolve(info)})")
        try:
            arr = np.asarray(value, dtype=np.float64 if self.dtype.startswith("float") else None)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise KilnError(f"argument '{name}' must be a numeric array of shape {self.resolve(info)}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) \
                or (isinstance(value, list) and not_a_number(value) is not None):
            raise KilnError(f"argument '{name}' must be a numeric array of shape {self.resolve(info)}")
        want = self.resolve(info)
        if arr.ndim == len(want) - 1 and want and want[0] is None:
            arr = arr[None]  # a single example without the batch axis
        if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, arr.shape)):
            raise KilnError(f"argument '{name}' has shape {list(arr.shape)}; expected {want} (None = any size)")
        if arr.size == 0 and self.shape and self.shape[0] is None:
            raise KilnError(f"argument '{name}' has shape {list(arr.shape)}: no items; send at least one")
        if arr.size and not np.all(np.isfinite(arr)):
            raise KilnError(f"argument '{name}' contains NaN or infinite values")
        if self.min is not None and arr.size and arr.min() < self.min:
            raise KilnError(f"argument '{name}' has values below {self.min} (allowed range [{self.min}, {self.max}])")
        if self.max is not None and arr.size and arr.max() > self.max:
            raise KilnError(f"argument '{name}' has values above {self.max} (allowed range [{self.min}, {self.max}])")
        return arr.astype(self.dtype)

    def json_schema(self, info: DatasetInfo) -> dict[str, Any]:
        return {"type": "array", "x-shape": self.resolve(info), "x-dtype": self.dtype,
                "minimum": self.min, "maximum": self.max, "description": self.description,
                "x-optional": self.optional}


@dataclass(frozen=True)
class Scalar:
    """A number or string argument with bounds or choices; ``type`` is int, float, str or bool."""

    type: type = int
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    description: str = ""
    count: bool = False  # how many items the method makes (samples): the server bounds it
    # a string's characters are the dataset's class names (a character model's vocabulary)
    alphabet: bool = False

    def validate(self, name: str, value: Any, info: DatasetInfo) -> Any:
        if value is None:
            if self.default is None:
                raise KilnError(f"missing required argument '{name}'")
            return self.default
        if self.type is str and isinstance(value, str):  # a string's bounds are its length
            if not (self.min or 0) <= len(value) <= (self.max or math.inf):
                raise KilnError(f"argument '{name}' has {len(value)} characters; give {self.min or 0} "
                                f"to {self.max or 'any number of'}")
            return value
        meta = {"min": self.min, "max": self.max, "choices": self.choices}
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.type]
        # JSON's own types, as the method's schema states them: numpy and Python would read
        # false as a prompt "False", or "1" as a number
        json_type = {str: str, bool: bool, int: (int, float), float: (int, float)}[self.type]
        if not isinstance(value, json_type) or (self.type in (int, float) and isinstance(value, bool)):
            raise KilnError(f"argument '{name}' must be {kind}, got {type(value).__name__} {str(value)[:40]!r}")
        try:
            return _coerce(value, self.type, name, meta)
        except (KilnError, OverflowError):  # the config wording, as an argument's
            raise KilnError(f"bad value {str(value)[:40]!r} for argument '{name}': expected "
                            + _describe(name, self.type, meta).split(": ", 1)[1]) from None

    def json_schema(self, info: DatasetInfo) -> dict[str, Any]:
        t = {int: "integer", float: "number", str: "string", bool: "boolean"}[self.type]
        out = {"type": t, "default": self.default, "minimum": self.min, "maximum": self.max,
               "enum": list(self.choices) if self.choices else None, "description": self.description,
               "x-count": self.count}
        if self.alphabet:
            out["pattern"] = f"^[{''.join(_in_class(c) for c in info.class_names)}]*$"
        return out


def _in_class(c: str) -> str:
    """One character inside a regular expression's [...], as JSON Schema's (ECMA 262) and
    Python's both read it."""
    if c in "\\]^-[":
        return "\\" + c
    return c if c.isprintable() else f"\\u{ord(c):04x}"


Schema = Tensor | Scalar


@dataclass(frozen=True)
class Method:
    """An inference method a plugin offers: its name, validated inputs and output description."""

    name: str
    inputs: dict[str, Schema]
    outputs: dict[str, str]
    doc: str
    fn: Callable[..., dict[str, Any]]

    def describe(self, info: DatasetInfo) -> dict[str, Any]:
        return {"inputs": {k: v.json_schema(info) for k, v in self.inputs.items()},
                "outputs": dict(self.outputs), "doc": self.doc}


def inference(*, outputs: dict[str, str] | None = None, **inputs: Schema) -> Callable:
    """Declare a plugin method as an inference method with validated ``inputs``.

    The method receives the model and the validated arguments and returns a dict of outputs.
    """

    def wrap(fn: Callable) -> Callable:
        fn.__kiln_inference__ = (inputs, outputs or {})  # type: ignore[attr-defined]
        return fn

    return wrap


# --------------------------------------------------------------------------- the plugin


# the methods a plugin's predict method is the first of, where it names none (``Plugin.predict``)
PREDICT_ORDER = ("classify", "reconstruct", "encode", "decode")


def predict_method(methods: dict[str, Any], named: str | None) -> tuple[str, str] | None:
    """The method TF Serving's :predict, v2's infer and ``kiln predict`` call, and its one array
    argument, among ``methods`` as ``Method.describe`` writes them (a manifest's, GET /models'):
    the one ``named`` (``Plugin.predict``), else the first of PREDICT_ORDER that takes exactly one
    required array. None where there is none, or the named one takes no single array."""
    def array(name: str) -> str | None:
        arrays = [k for k, s in (methods.get(name) or {}).get("inputs", {}).items()
                  if s["type"] == "array" and not s.get("x-optional")]
        return arrays[0] if len(arrays) == 1 else None

    for name in [named] if named else PREDICT_ORDER:
        arg = array(name)
        if arg is not None:
            return name, arg
    return None


class Plugin:
    """Base class of every model family. Subclass it, set the class attributes, implement build().

    Lifecycle: ``Plugin(config)`` -> ``setup(info)`` -> ``build()`` returns a compiled Keras model
    (called under the distribution strategy's scope). Training calls ``model.train_step`` inside
    Kiln's loop, so a plugin that needs its own step (a GAN, a VAE) overrides ``train_step`` on its
    ``keras.Model`` exactly as keras-io examples do.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    dataset: ClassVar[str] = "mnist"
    epochs: ClassVar[int] = 1
    batch_size: ClassVar[int] = 128
    #: metric (key of evaluate()'s result) shown first in listings
    headline: ClassVar[str] = "loss"
    #: a generative plugin whose ``sample`` output a stored classifier can judge: the classifier's
    #: model name in the store (``kiln evaluate``; see kiln.quality)
    judged_by: ClassVar[str | None] = None
    #: samples per class the judge draws when a run ends (``kiln evaluate`` always draws 1,000):
    #: fewer where drawing one costs many network calls
    judge_per_class: ClassVar[int] = 1000
    #: the ``sample`` argument that picks the class, for conditional generators (label accuracy)
    condition: ClassVar[str | None] = None
    #: the inference method that TF Serving's ``:predict`` and v2's ``infer`` call (it must take
    #: exactly one required array); None: the first of classify, reconstruct, encode, decode
    predict: ClassVar[str | None] = None
    #: share of the training data held out for validation when the dataset has no validation split
    val_fraction: ClassVar[float] = 0.1
    #: the dtype policies it trains under (``kiln train --precision``)
    precisions: ClassVar[tuple[str, ...]] = ("float32", "mixed_float16", "mixed_bfloat16")
    #: why a plugin without an ``export_model`` has none (``kiln export``, ``--register``)
    no_export: ClassVar[str] = ""
    # what a stored manifest's config means by leaving a key out: the value of the Kiln that
    # stored it, where a key added since then defaults to another network (models.load)
    stored_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        if config is None:
            config = make_config(self.Config, overrides)
        elif overrides:
            config = make_config(self.Config, {**dataclasses.asdict(config), **overrides})
        self.config = config
        self.info: DatasetInfo | None = None
        #: where on_epoch_end may write progress pictures during training (rank 0); else None
        self.progress_dir: Path | None = None
        #: the model store this plugin trains into or was loaded from (set before setup(), so a
        #: plugin that reuses a stored model, like transfer, can read it from there)
        self.store: str | Path | None = None
        #: optimizer steps the whole run will take (epochs x steps per epoch), set before build()
        #: when training, so a learning-rate schedule can span the run; 0 when only loading
        self.total_steps: int = 0

    # -- data ---------------------------------------------------------------------------
    def setup(self, info: DatasetInfo) -> None:
        """Receive the dataset description before build(); raise KilnError if the data does not fit."""
        self.info = info

    def image_view(self) -> tuple[int, int | None]:
        """The side and channels (None: from the pictures) an image folder is read at for this
        config (kiln.run.plan asks before any work); ImageOptions' fields by default."""
        c = self.config
        return (getattr(c, "image_size", ImageOptions.image_size),
                c.image_channels() if isinstance(c, ImageOptions) else None)

    def train_per_class(self) -> int | None:
        """Train on only the first N examples of each class (a small labelled budget); None: all."""
        return None

    def preprocess(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Map a *batch* of raw examples (as the dataset yields them) to model inputs/targets (tf ops)."""
        return x, y

    # -- model --------------------------------------------------------------------------
    def build(self) -> Any:
        """Return a built and compiled ``keras.Model``."""
        raise NotImplementedError

    def evaluate(self, model: Any, test: Any) -> dict[str, float]:
        """Metrics on the preprocessed test dataset; the default runs the compiled metrics."""
        out = model.evaluate(test, verbose=0, return_dict=True)
        return {k: float(v) for k, v in out.items()}

    def samples(self, model: Any, test: Any, out_dir: Path) -> list[Path]:
        """Write PNG artifacts (sample grids, reconstructions...) into out_dir; return their paths."""
        return []

    def on_epoch_end(self, model: Any, epoch: int, logs: dict[str, float], rank: int) -> None:
        """Called on every worker after each epoch (1-based) with the global logs."""

    def export_model(self, model: Any) -> Any:
        """The network behind this plugin's predict method as other servers run it (``kiln
        export``): a ``keras.Model`` from the method's raw inputs (named as its arguments) to its
        main output, preprocessing included, so the exported file answers what Kiln answers.
        A plugin without one keeps this one, which says why (``no_export``)."""
        raise KilnError(self.no_export_reason())

    @classmethod
    def no_export_reason(cls) -> str:
        return cls.no_export or (f"plugin '{cls.name}' names no network to export: its export_model() "
                                 "would return a keras.Model from its predict method's raw input to its output")

    def save_assets(self, model: Any, test: Any, out_dir: Path) -> None:
        """Write files inference needs besides weights (a latent bank, ...) into out_dir; they
        are stored with the model version and handed to load_assets() when it is loaded."""

    def load_assets(self, directory: Path) -> None:
        """Read what save_assets() wrote (called after the weights are loaded)."""

    # -- inference ----------------------------------------------------------------------
    @classmethod
    def methods(cls) -> dict[str, Method]:
        """The inference methods declared with ``@inference``, by name; listed once per class
        (every served call asks for them)."""
        listed = cls.__dict__.get("_kiln_methods")  # the class's own: a subclass lists its own
        if listed is not None:
            return listed
        out = {}
        for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
            spec = getattr(fn, "__kiln_inference__", None)
            if spec is not None:
                doc = (inspect.getdoc(fn) or "").split("\n")[0]
                out[name] = Method(name, spec[0], spec[1], doc, fn)
        cls._kiln_methods = out
        return out

    def infer(self, model: Any, method: str, args: dict[str, Any]) -> dict[str, Any]:
        """Validate ``args`` against the method's schema and run it."""
        assert self.info is not None, "setup(info) must run before inference"
        methods = self.methods()
        if method not in methods:
            raise KilnError(f"plugin '{self.name}' has no inference method '{method}'; "
                            f"available: {', '.join(sorted(methods))}")
        m = methods[method]
        unknown = set(args) - set(m.inputs)
        if unknown:
            raise KilnError(f"unknown argument(s) {', '.join(sorted(unknown))} for '{method}'; "
                            f"expected: {', '.join(m.inputs)}")
        clean = {k: s.validate(k, args.get(k), self.info) for k, s in m.inputs.items()}
        return m.fn(self, model, **clean)
