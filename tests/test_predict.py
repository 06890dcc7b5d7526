"""`kiln predict --input`: a stored model over a dataset on Ray Data (a real Ray, real actors,
real files), compared with the same model's answers in this process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TEST_PLUGINS, copy_models, kiln_here

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("predict")
    copy_models(trained, root / "store", "cnn", "lstm")
    return root / "store"


def mnist(n: int):
    from kiln import data

    split = data.load("mnist", "test", limit=n)
    xs, ys = zip(*split.ds.take(n).as_numpy_iterator())
    return np.stack(xs), np.asarray(ys)


def in_process(store, ref: str, x):
    from kiln import models

    plugin, model, _ = models.load(ref, store)
    return plugin.classify(model, x.astype("float32"))


@pytest.mark.ray
def test_a_folder_of_pictures_gets_a_row_each_and_a_broken_file_says_why(store, tmp_path, shared_ray):
    import pandas as pd
    from PIL import Image

    x, y = mnist(40)
    folder = tmp_path / "pictures"
    for i in range(len(x)):
        (folder / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i][..., 0]).save(folder / str(y[i]) / f"{i:03d}.png")
    # an RGB picture the model reads as grayscale, and a file that is no picture at all
    Image.fromarray(np.repeat(x[0], 3, axis=-1)).save(folder / "rgb.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    # two actors hold both of the shared Ray's CPUs: the decode tasks, which claim none, still run
    out = kiln_here("predict", "cnn", "--input", str(folder), "--output", str(tmp_path / "scored.parquet"),
                    "--batch-size", "16", "--workers", "2", "--store", str(store))
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "scored 42 rows with cnn:1.classify (1 with an error)" in out.stdout
    rows = pd.read_parquet(tmp_path / "scored.parquet")
    assert len(rows) == 42 and list(rows["path"]) == sorted(rows["path"])  # input order
    broken = rows[rows["path"] == "broken.png"].iloc[0]
    assert "not a PNG, JPEG, GIF or BMP picture" in broken["error"] and pd.isna(broken["label"])
    good = rows[rows["error"].isna() & (rows["path"] != "rgb.png")]
    index = [int(p.split("/")[1][:3]) for p in good["path"]]
    expected = in_process(store, "cnn:1", x[index])
    assert list(good["class"]) == expected["classes"]
    np.testing.assert_allclose(good["probability"], np.max(expected["probabilities"], axis=1), atol=1e-5)
    np.testing.assert_allclose([json.loads(p) for p in good["probabilities"]], expected["probabilities"], atol=1e-5)
    assert rows[rows["path"] == "rgb.png"].iloc[0]["class"] == expected["classes"][index.index(0)]


def test_a_batch_of_only_unreadable_files_is_decoded_to_rows_that_say_why(tmp_path):
    from kiln.cluster import predict

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 cut short")
    out = predict.decode({"path": np.array(["a.png", "b.jpg", "gone.png"])}, str(tmp_path), (None, 28, 28, 1))
    assert out["pixels"].shape == (3, 28, 28, 1) and out["pixels"].dtype == np.uint8
    assert ["not a PNG" in e for e in out["error"][:2]] == [True, True]
    assert "gone.png" in out["error"][2]


@pytest.mark.ray
def test_prompts_to_text_for_a_character_model(store, tmp_path, shared_ray):
    import pandas as pd

    (tmp_path / "prompts.txt").write_text("ROMEO:\nno such char: \u2603\nJULIET:\n")
    out = kiln_here("predict", "lstm", "--input", str(tmp_path / "prompts.txt"), "--output",
                    str(tmp_path / "lines.parquet"), "--set", "max_chars=30", "--set", "seed=3",
                    "--store", str(store))
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    rows = pd.read_parquet(tmp_path / "lines.parquet")
    assert list(rows["index"]) == [0, 1, 2]
    assert rows["text"][0].startswith("ROMEO:") and len(rows["continuation"][0]) == 30
    assert "outside the model's" in rows["error"][1] and pd.isna(rows["text"][1])
    from kiln import models

    plugin, model, _ = models.load("lstm:1", store)
    assert rows["text"][2] == plugin.generate(model, "JULIET:", 30, 1.0, 3)["text"]  # the same seed, the same text


@pytest.mark.ray
def test_an_actor_killed_mid_job_loses_no_row_in_an_npz_scored_to_csv(store, tmp_path, shared_ray):
    import pyarrow.dataset as pads

    out = kiln_here("--plugin-path", str(TEST_PLUGINS / "flaky.py"), "train", "flaky", "--limit", "300",
                    "--epochs", "1", "--set", "die_once=true", "--store", str(store), "--run", "dies",
                    "--runs-dir", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr[-3000:]
    x, _ = mnist(64)
    np.savez(tmp_path / "digits.npz", x=x)
    out = kiln_here("predict", "flaky", "--input", str(tmp_path / "digits.npz"), "--output",
                    str(tmp_path / "scored.csv"), "--batch-size", "16", "--store", str(store))
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert (shared_ray / "flaky-died").is_file()  # an actor did die
    # a folder of CSV part files, as Ray Data writes: read whole, in order
    rows = pads.dataset(str(tmp_path / "scored.csv"), format="csv").to_table().to_pandas()
    assert list(rows["index"]) == list(range(64)) and rows["error"].isna().all()
    assert list(rows["class"]) == in_process(store, "flaky:1", x)["classes"]


def test_batch_prediction_mistakes_are_one_line_before_ray(store, tmp_path):
    (tmp_path / "taken.parquet").mkdir()
    (tmp_path / "p.txt").write_text("ROMEO:\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (("--input", str(tmp_path / "nothing")), "--input needs --output"),
        (("--input", str(tmp_path / "nothing"), "--output", "x.json"), "name it .parquet or .csv"),
        (("--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o.csv")), "no such file or folder"),
        (("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o.csv")), "is not a HAR dataset"),
        (("--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "taken.parquet")), "already exists"),
        (("--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.csv")), "has no generate method"),
        (("--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.csv"), "--method", "nope"),
         "has no such method"),
        ((), "give --input PATH --output OUT"),
    ]
    for args, expected in cases:
        out = kiln_here("predict", "cnn", *args, "--store", str(store), cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, out.stderr[-2000:])
    out = kiln_here("predict", "lstm", "--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.csv"),
                   "--set", "temperature=0", "--store", str(store))
    assert out.returncode == 2 and "temperature" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "o.csv").exists()
