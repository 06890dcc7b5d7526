"""A command's options are declared once (kiln.options): the flags, the checks and the config file
all come from the declaration, so none of them can miss an option the others have."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from kiln import KilnError, options
from kiln.serve.options import ServeOptions


def parsed(*argv: str) -> ServeOptions:
    parser = argparse.ArgumentParser()
    options.add_flags(parser, ServeOptions)
    return options.from_args(ServeOptions, parser.parse_args(argv))


def test_every_serve_option_is_a_flag_with_its_default():
    assert parsed() == ServeOptions()
    got = parsed("--port", "9000", "--replicas", "1-3", "--max-body-mb", "2.5", "--traffic", "cnn:1=3",
                 "--traffic", "cnn@canary=1", "--shared-replicas", "--own-replicas", "lstm")
    assert (got.port, got.replicas, got.max_body_mb) == (9000, "1-3", 2.5)
    assert got.traffic == ["cnn:1=3", "cnn@canary=1"] and got.shared_replicas and got.own_replicas == ["lstm"]


@pytest.mark.parametrize("argv, words", [
    (["--max-items", "0"], "--max-items must be greater than 0, got 0"),
    (["--port", "70000"], "--port must be at most 65535, got 70000"),
    (["--cpus-per-replica", "-1"], "--cpus-per-replica must be at least 0, got -1"),
    (["--poll-seconds", "-2"], "--poll-seconds must be at least 0"),
])
def test_a_value_out_of_bounds_names_its_flag(argv, words):
    with pytest.raises(KilnError, match=words):
        parsed(*argv)


def test_a_written_config_carries_every_option_but_the_process_ones():
    every = ServeOptions(host="0.0.0.0", port=9001, replicas="2-4", target_ongoing_requests=3.0,
                         cpus_per_replica=0.5, gpus_per_replica=0.5, gpu_memory_mb=512, max_ongoing_requests=7,
                         batch_size=4,
                         batch_wait_ms=1.0, max_body_mb=3.0, max_items=9, max_chars=99, max_response_mb=5.0,
                         body_timeout_s=7.0, request_timeout_s=30.0, client_timeout_s=11, max_connections=55,
                         traffic=["cnn:1=1"], shared_replicas=True, own_replicas=["lstm"],
                         models_per_replica=2, colocate=True, access_log=True,
                         address="ray://elsewhere:10001", ready_timeout=9.0, poll_seconds=0.0,
                         mlflow="http://127.0.0.1:5000")
    written = options.to_dict(every)
    process = {f.name for f in fields(ServeOptions) if f.metadata["process"]}
    assert process == {"address", "ready_timeout", "poll_seconds", "mlflow"}
    assert set(written) == {f.name for f in fields(ServeOptions)} - process
    back = options.from_dict(ServeOptions, written, "args.options")
    assert all(getattr(back, k) == getattr(every, k) for k in written)


@pytest.mark.parametrize("values, words", [
    ({"max_body_bytes": 5}, "no option 'max_body_bytes'; it takes host, port"),
    ({"address": "x"}, "no option 'address'"),   # the process's own, never read from a file
    ({"max_items": "many"}, r"args.options.max_items must be a whole number, got 'many'"),
    ({"shared_replicas": "yes"}, "must be true or false"),
    ({"traffic": "cnn:1=1"}, "must be a list of strings"),
    ({"max_items": 0}, "--max-items must be greater than 0"),
])
def test_a_config_file_with_a_wrong_option_says_which(values, words):
    with pytest.raises(KilnError, match=words):
        options.from_dict(ServeOptions, values, "args.options")


def test_a_whole_number_is_a_number():
    assert options.from_dict(ServeOptions, {"max_body_mb": 2}, "x").max_body_mb == 2.0


def test_kiln_train_and_tune_take_their_declared_options():
    from kiln import cli
    from kiln.spec import TrainOptions
    from kiln.tune import SearchOptions

    args = cli.parser().parse_args(["tune", "cnn", "--set", "dropout=0.3", "--set", "filters=16,32",
                                    "--workers", "1-2", "--val-fraction", "0.2", "--search",
                                    "dropout=uniform:0.1:0.5", "--scheduler", "fifo"])
    train = options.from_args(TrainOptions, args)
    assert train.overrides == {"dropout": "0.3", "filters": "16,32"}
    assert (train.workers, train.val_fraction) == ("1-2", 0.2)
    search = options.from_args(SearchOptions, args)
    assert search.search == ["dropout=uniform:0.1:0.5"] and search.scheduler == "fifo"
    helps = cli.parser().train_parser.format_help()
    assert all(options.flag(f.name, f) in helps for f in fields(TrainOptions))
