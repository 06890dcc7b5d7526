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
