"""``kiln predict MODEL --input PATH --output OUT``: a stored model over a whole dataset on Ray
Data, on this machine or a cluster.

Pictures are read and decoded by Ray Data tasks and scored by a pool of actors, each holding
the model (two ``map_batches`` stages, so that decoding on one core overlaps the model on
another, and on GPU nodes the CPUs decode while the actors hold the GPUs); the rows of an .npz,
a HAR folder or a prompt file go to Ray's object store once and the actors take them by number.
Ray Data's writer writes one row per input, in input order, as Parquet or CSV. A row that cannot be
scored (a file that is not a picture, a prompt the model cannot read) carries why in its
``error`` column and the rest are scored; an actor that dies is restarted by Ray Data, which retries its
task (actors of ``map_batches`` restart without limit by default).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln import data
from kiln.logs import say
from kiln.options import option
from kiln.plugin import PREDICT_ORDER, DatasetInfo, KilnError, Scalar, predict_method

FORMATS = {".parquet": "parquet", ".csv": "csv"}


@dataclass
class PredictOptions:
    """``kiln predict``'s options for a dataset (``--input``)."""

    output: str | None = option(None, "where to write one row per input: a folder Ray Data writes, "
                                      "named .parquet or .csv", metavar="OUT.parquet|OUT.csv")
    method: str | None = option(None, "the inference method (default: the model's predict method; "
                                      "for a text file, generate)")
    overrides: dict[str, Any] = option({}, "a further argument of the method, the same for every row "
                                           "(e.g. --set max_chars=200)", flag="set", metavar="KEY=VALUE")
    workers: int = option(1, "actors each holding the model", low=1)
    batch_size: int = option(256, "rows per model call", low=1)
    cpus_per_worker: float = option(1.0, "CPUs Ray gives each actor", above=0)
    gpus_per_worker: float = option(0.0, "GPUs Ray gives each actor", low=0)
    address: str | None = option(None, "Ray cluster address to run on (default: start a local one)")


@dataclass
class PredictSpec:
    ref: str                 # name:version, resolved
    store: str
    input: str               # absolute
    kind: str                # "images", "arrays" or "text"
    output: str              # absolute
    method: str
    arg: str                 # the argument each row fills
    args: dict[str, Any]     # the method's other arguments (--set, else their defaults), validated
    opts: PredictOptions
    shape: tuple[int | None, ...] | None = None  # the pictures' (None, H, W[, C]), for "images"


def plan(ref: str, path: str, opts: PredictOptions, store: str | None = None) -> PredictSpec:
    """Validate a batch prediction before Ray starts; KilnError naming what is wrong."""
    from kiln import models, options
    from kiln.store import Store

    options.check(opts)
    if not opts.output:
        raise KilnError("--input needs --output OUT.parquet or OUT.csv: where to write a row per input")
    out = Path(opts.output).expanduser().resolve()
    if out.suffix.lower() not in FORMATS:
        raise KilnError(f"--output {opts.output}: name it .parquet or .csv (the format Ray Data writes)")
    if out.exists():
        raise KilnError(f"--output {out} already exists; remove it or choose another name")
    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise KilnError(f"--input {path}: no such file or folder")
    kind = _kind(source)
    if kind == "arrays" and source.is_dir():
        data.test_arrays(str(source))  # a folder that is no HAR set: one line before Ray starts (cached)
    found = Store(store)
    version = found.get(ref, whole=False)
    cls = models.plugin_class(version.manifest)
    methods = cls.methods()
    method = opts.method or ("generate" if kind == "text" else None)
    if method is None:
        default = predict_method(version.manifest.get("methods", {}), version.manifest.get("predict"))
        if default is None:
            raise KilnError(f"{version.ref} has no predict method (one of {', '.join(PREDICT_ORDER)}, or the "
                            "one its plugin names); name one with --method")
        method = default[0]
    if method not in methods:
        asked = f"--method {method}: {version.ref} has no such method" if opts.method else \
            f"{version.ref} has no {method} method for the prompts of {source}"
        raise KilnError(f"{asked}; its methods: {', '.join(sorted(methods))}")
    m = methods[method]
    text = [k for k, s in m.inputs.items() if isinstance(s, Scalar) and s.type is str]
    arrays = [k for k, s in m.inputs.items() if not isinstance(s, Scalar)]
    row_args = text if kind == "text" else arrays
    if not row_args:
        raise KilnError(f"{version.ref}'s {method} takes no {'text' if kind == 'text' else 'array'} argument "
                        f"for the rows of {source}; pick another --method or --input")
    arg = row_args[0]
    others = [k for k in m.inputs if k != arg]
    unknown = sorted(set(opts.overrides) - set(others))
    if unknown:
        raise KilnError(f"--set {unknown[0]}: {method} takes {', '.join(others) or 'nothing else'}")
    info = DatasetInfo.from_dict(version.manifest["dataset"])
    args = {}
    for k in others:  # validated here: a bad value is one line, not an error in every row
        s = m.inputs[k]
        value = opts.overrides.get(k)
        if value is not None and not (isinstance(s, Scalar) and s.type is str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        args[k] = s.validate(k, value, info)
    shape = tuple(m.inputs[arg].resolve(info)) if kind == "images" else None
    return PredictSpec(ref=version.ref, store=found.spec, input=str(source), kind=kind, output=str(out),
                       method=method, arg=arg, args=args, opts=opts, shape=shape)


def _kind(source: Path) -> str:
    if source.is_dir():
        if next(_pictures(source), None) is not None:
            return "images"
        if data.kind(str(source)) == "sensors":
            return "arrays"
        raise KilnError(f"--input {source}: no pictures ({', '.join(data.IMAGE_TYPES)}) in it or its "
                        "subfolders, and not a HAR folder")
    if source.suffix == ".npz":
        return "arrays"
    if source.suffix == ".txt":
        return "text"
    raise KilnError(f"--input {source}: give a folder of pictures, an .npz, a HAR folder or a .txt of prompts")


def _pictures(folder: Path):
    return (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in data.IMAGE_TYPES and p.is_file())


def _rows(spec: PredictSpec) -> Any:
    """The rows Ray Data hands out by number: the pictures' paths (relative to the input folder),
    or the rows themselves (an array, or a list of prompts)."""
    source = Path(spec.input)
    if spec.kind == "images":
        return [str(p.relative_to(source)) for p in _pictures(source)]
    if spec.kind == "text":
        prompts = [line for line in source.read_text(errors="replace").splitlines() if line.strip()]
        if not prompts:
            raise KilnError(f"--input {source}: no prompts in it (one per line)")
        return prompts
    if source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as f:
                key = next((k for k in ("x", "x_test") if k in f.files), None)
                if key is None:
                    raise KilnError(f"--input {source}: holds {', '.join(f.files) or 'nothing'}; score an "
                                    "array named x (or x_test)")
                return f[key]
        except KilnError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever numpy says, it is not an .npz it reads
            raise KilnError(f"--input {source}: cannot read it as .npz: {e}") from None
    return data.test_arrays(str(source))[0]


def decode(batch: dict[str, np.ndarray], root: str, shape: tuple[int | None, ...]) -> dict[str, np.ndarray]:
    """Ray Data's first stage for pictures: each path's pixels (0-255, as uint8: a quarter of
    float32's bytes through the object store), or zeros and why it could not be read."""
    from kiln import images

    paths = batch["path"]
    errors: list[str | None] = [None] * len(paths)
    pixels = None
    for i, p in enumerate(paths):
        try:
            x = images.decode((Path(root) / p).read_bytes(), shape, source=str(p))
        except Exception as e:  # noqa: BLE001 - this row fails alone
            errors[i] = _why(e)
            continue
        if pixels is None:
            pixels = np.zeros((len(paths), *x.shape), "uint8")
        if x.shape != pixels.shape[1:]:  # a model that takes any size: one size per batch
            errors[i] = f"{p} is {x.shape}, not {pixels.shape[1:]} as the batch's first picture; " \
                        "resize the pictures to one size"
            continue
        pixels[i] = x
    if pixels is None:  # no row could be read: zeros of the model's shape, where it declares one
        pixels = np.zeros((len(paths), *[d or 1 for d in shape[1:]]), "uint8")
    return {"path": paths, "pixels": pixels, "error": np.array(errors, dtype=object)}


class Scorer:
    """One actor of the pool: the stored model, and its method over a batch of rows."""

    def __init__(self, spec: PredictSpec, rows: Any = None) -> None:
        import ray

        from kiln import devices, models

        # TensorFlow's threads to the actor's CPUs: actors side by side do not oversubscribe
        devices.configure(max(1, int(spec.opts.cpus_per_worker)), gpus=spec.opts.gpus_per_worker > 0)
        self.spec = spec
        self.rows = ray.get(rows) if isinstance(rows, ray.ObjectRef) else rows
        self.plugin, self.model, _ = models.load(spec.ref, spec.store)
        self.method = self.plugin.methods()[spec.method]
        self.schema = self.method.inputs[spec.arg]

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        if self.spec.kind == "images":  # decoded by the stage before (``decode``)
            keys = {"path": [str(p) for p in batch["path"]]}
            # a column of no error at all comes back as NaNs, not Nones
            errors = [e if isinstance(e, str) else None for e in batch["error"]]
            values = list(batch["pixels"].astype("float32"))
        else:
            keys = {"index": batch["data"].astype("int64")}
            values = [self.rows[int(i)] for i in batch["data"]]
            errors = [None] * len(values)
        outputs = self._score(values, errors)
        # every batch the same schema, whichever of its rows failed (a writer's files are one table)
        types = {"index": pa.int64(), "class": pa.int64(), "probability": pa.float64()}
        columns = {**keys, **outputs, "error": errors}
        return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in columns.items()})

    def _score(self, values: list[Any], errors: list[str | None]) -> dict[str, list[Any]]:
        """Each row's outputs (None where it failed), filling ``errors``."""
        ok = [i for i, e in enumerate(errors) if e is None]
        out: dict[str, Any] = {}
        info = self.plugin.info
        if self.spec.kind == "text":
            done = []
            for i in ok:
                try:
                    text = self.schema.validate(self.spec.arg, values[i], info)
                    row = self.method.fn(self.plugin, self.model, **{self.spec.arg: text}, **self.spec.args)
                except Exception as e:  # noqa: BLE001
                    errors[i] = _why(e)
                    continue
                done.append(i)
                for k, v in row.items():
                    out.setdefault(k, []).append(v)
            ok = done
        elif ok:
            x = None
            try:
                x = self.schema.validate(self.spec.arg, np.stack([values[i] for i in ok]), info)
            except Exception:  # noqa: BLE001 - find the rows at fault: each one alone
                for i in ok:
                    try:
                        self.schema.validate(self.spec.arg, np.asarray(values[i])[None], info)
                    except Exception as e:  # noqa: BLE001
                        errors[i] = _why(e)
                ok = [i for i in ok if errors[i] is None]
                if ok:
                    x = self.schema.validate(self.spec.arg, np.stack([values[i] for i in ok]), info)
            if x is not None:
                out = self.method.fn(self.plugin, self.model, **{self.spec.arg: x}, **self.spec.args)
        return _columns(self.spec.method, out, ok, len(values))


def _columns(method: str, out: dict[str, Any], ok: list[int], n: int) -> dict[str, list[Any]]:
    """Output columns of ``n`` rows from the outputs of rows ``ok`` (None in the others): a
    classifier's class, label and probability (its top class's), with the whole distribution as
    JSON; otherwise each output as text (JSON where it is not a string). Whole batches at once,
    in the actor: the narrowest stage of the pipeline (BENCHMARKS.md)."""
    def spread(values: Any) -> list[Any]:
        column: list[Any] = [None] * n
        for i, v in zip(ok, values):
            column[i] = v
        return column

    if method == "classify":
        probs = np.asarray(out.get("probabilities", []), dtype="float64")
        return {"class": spread(np.asarray(out.get("classes", []), dtype="int64").tolist()),
                "label": spread([str(v) for v in out.get("labels", [])]),
                "probability": spread(probs.max(axis=-1).tolist() if len(probs) else []),
                "probabilities": spread(_json(row) for row in probs)}
    return {k: spread(v if isinstance(v, str) else _json(v) for v in values) for k, values in out.items()}


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_plain).decode()


def _plain(o: Any) -> Any:
    """What orjson leaves to ``default``: arrays that are not C-contiguous or hold strings, and
    NumPy scalars it does not take."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:500]


def run(spec: PredictSpec) -> dict[str, Any]:
    """Score every row and write them; the summary (rows, errors, seconds, rows/s, output)."""
    import pyarrow as pa
    import ray

    from kiln.cluster.train import connect

    rows = _rows(spec)
    t0 = time.perf_counter()
    connect(spec.opts.address, dashboard=False)  # Ray Data needs none
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come out in input order
    ctx.enable_progress_bars = sys.stderr.isatty()
    # Ray Data's own INFO lines (execution plan, where its logs are) and the warning that bars
    # are off where stderr is no terminal; its errors still show
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # the pictures' paths in blocks, or row numbers into the inputs in Ray's object store once:
    # Ray Data's file readers make a block of each file, which costs more than decoding it
    n = len(rows)
    o = spec.opts
    # made here, not by read tasks, in blocks of about 1024 rows, and at least one per actor
    # (where there are the rows): an actor without a block is idle, and Ray Data warns of it
    blocks = max(1, min(n, max(min(n // 1024, 200), o.workers)))
    if spec.kind == "images":
        ds = ray.data.from_arrow([pa.table({"path": part}) for part in np.array_split(np.array(rows), blocks)])
        # decoding claims no CPU, so that it runs even where the actors hold every CPU (a task that
        # waited for one would stall the run), on as many at once as the actors leave free, and
        # one more, so that a decoded block is ready when an actor asks (BENCHMARKS.md)
        free = int(ray.cluster_resources().get("CPU", 1) - o.workers * o.cpus_per_worker)
        ds = ds.map_batches(decode, fn_kwargs={"root": spec.input, "shape": spec.shape}, batch_size=o.batch_size,
                            compute=ray.data.TaskPoolStrategy(size=min(blocks, max(1, free) + 1)), num_cpus=0,
                            batch_format="numpy")
        rows = None
    else:
        ds = ray.data.from_numpy(np.array_split(np.arange(n), blocks))
        rows = ray.put(rows)
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"spec": spec, "rows": rows}, batch_size=o.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=o.workers), num_cpus=o.cpus_per_worker,
                        num_gpus=o.gpus_per_worker or None, batch_format="numpy")
    fmt = FORMATS[Path(spec.output).suffix.lower()]
    tmp = Path(spec.output).with_name(f".{Path(spec.output).name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # writing a few small columns takes no CPU of its own (see above)
        getattr(ds, f"write_{fmt}")(str(tmp), ray_remote_args={"num_cpus": 0})
        written, failed, first = _count(tmp, fmt)
        if written and failed == written:
            raise KilnError(f"--input {spec.input}: no row could be scored ({first})")
        tmp.rename(spec.output)  # a complete output or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = {"rows": written, "errors": failed, "seconds": round(seconds, 2),
               "rows_per_s": round(written / seconds, 1), "output": spec.output, "inputs": n}
    say(f"scored {written} rows with {spec.ref}.{spec.method} ({failed} with an error) in {seconds:.1f} s, "
        f"{written / seconds:.0f} rows/s; wrote {spec.output}")
    return summary


def _count(folder: Path, fmt: str) -> tuple[int, int, str]:
    """Rows written, rows with an error, and the first error."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(str(folder), format=fmt).to_table(columns=["error"])
    errors = table.column("error")
    failed = int(pc.sum(pc.is_valid(errors)).as_py() or 0)
    first = next((e for e in errors.to_pylist() if e), "")
    return table.num_rows, failed, first
