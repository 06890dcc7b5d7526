"""kiln.logs: TensorFlow's load-time notices are dropped by severity; everything else is kept."""

from kiln.logs import filter_notices

LOADING = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796058607.462970    4041 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.
I0000 00:00:1796058624.003688    4084 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
2026-11-30 17:00:00.123456: W tensorflow/core/framework/op.cc:1] an old-format warning
E0000 00:00:1796058624.103688    4084 cuda_dnn.cc:8] Unable to register cuDNN factory
/site-packages/somewhere.py:12: UserWarning: a Python warning while TensorFlow loads
"""


def test_kilns_default_level_keeps_errors_and_python_warnings_only():
    kept = filter_notices(LOADING, 2).splitlines()
    assert kept == ["E0000 00:00:1796058624.103688    4084 cuda_dnn.cc:8] Unable to register cuDNN factory",
                    "/site-packages/somewhere.py:12: UserWarning: a Python warning while TensorFlow loads"]


def test_a_level_the_user_sets_is_respected():
    assert filter_notices(LOADING, 0) == LOADING  # TF_CPP_MIN_LOG_LEVEL=0: everything, as TF prints it
    kept = filter_notices(LOADING, 1)
    assert "oneDNN" not in kept and "To enable the following" not in kept  # an info record and its tail
    assert "an old-format warning" in kept and "cuDNN" in kept
    assert "UserWarning" in filter_notices(LOADING, 3)


NO_DRIVER = "I0000 00:00:1796605907.599887     876 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n"
CUINIT = "E0000 00:00:1796605911.228239     876 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"


def test_the_cuda_builds_no_driver_error_is_dropped_only_where_it_says_there_is_no_driver():
    """The tensorflow package on a machine without NVIDIA's driver: an info record says so, then
    an error record repeats it as a failed cuInit. Where a driver exists, that error is real."""
    assert filter_notices(NO_DRIVER + CUINIT, 2) == ""
    assert filter_notices(CUINIT, 2) == CUINIT
    assert filter_notices(NO_DRIVER + CUINIT, 0) == NO_DRIVER + CUINIT  # TF_CPP_MIN_LOG_LEVEL=0: as TF prints it


def test_a_fresh_process_that_lists_devices_prints_nothing_of_cuda():
    import subprocess
    import sys

    code = ("from kiln import logs; logs.quiet_process()\n"
            "import tensorflow as tf\n"
            "print(len(tf.config.list_physical_devices('CPU')))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["1"], out.stderr[-2000:]
    assert "cuInit" not in out.stderr and "cuda" not in out.stderr.lower(), out.stderr[-2000:]
