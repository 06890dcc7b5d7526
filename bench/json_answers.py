"""What writing a model's answer as JSON costs in the ingress, side by side in one process:
FastAPI's path for a returned dict (jsonable_encoder, then Starlette's JSONResponse, the standard
library's json) against orjson, for the answers of 256-image requests: a classifier's
probabilities (v2 infer's FP32 output, 256 x 10) and an autoencoder's reconstructions
(256 x 28 x 28).

    .venv/bin/python bench/json_answers.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import orjson
from fastapi.encoders import jsonable_encoder
from starlette.responses import JSONResponse


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn()``."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    probs = rng.random((256, 10), dtype=np.float32)
    answers = {
        "v2 infer, 256 x 10 probabilities": {
            "model_name": "cnn", "model_version": "1", "id": "r1",
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [256, 10],
                         "data": probs.ravel().tolist()},
                        {"name": "classes", "datatype": "INT64", "shape": [256],
                         "data": probs.argmax(1).tolist()}]},
        "reconstruct, 256 x 28 x 28 images": {"images": rng.random((256, 28, 28), dtype=np.float32).tolist()},
    }
    print(f"median of {args.repeat}, milliseconds per answer")
    for name, content in answers.items():
        fastapi = timed(lambda: JSONResponse(jsonable_encoder(content)), args.repeat)
        fast = timed(lambda: orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), args.repeat)
        print(f"  {name:<36} FastAPI {fastapi:8.2f}  orjson {fast:7.2f}  {fastapi / fast:5.1f}x")


if __name__ == "__main__":
    main()
