"""The bar for the TensorFlow route: real Keras architectures, frozen, converted, imported and run.

For each model of ``tf_models.ZOO`` (keras.applications CNNs with random weights, a
transformer encoder, an LSTM+GRU text model) the frozen graph is converted with TF's own
lists (``tf_amp_bf16``, ``allow_mix_precision_bf16``, TF's gray rule) and with
``ascend910b`` in ``allow_mix_precision`` (float16, emulated on this CPU); every output is
imported into a fresh graph and run, and compared with float32 and with grappler's own
``auto_mixed_precision_onednn_bfloat16`` pass on the same graph.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402

from tf_helpers import BF16, grappler_bf16, low_nodes, run_graph, runtime_casts  # noqa: E402
from tf_models import ZOO, build  # noqa: E402

TF_LISTS = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False,
                        gray_disagreement="low")
ASCEND = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False)

pytestmark = pytest.mark.slow


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


# under xdist (`make test`), tests/conftest.py groups these tests by model: each model is built and baselined once
@pytest.fixture(scope="module", params=sorted(ZOO))
def model(request):
    frozen = build(request.param)
    feeds = {frozen.inputs[0]: frozen.example}
    ref = run_graph(frozen.graph_def, feeds, frozen.outputs)[0]
    assert np.isfinite(ref).all() and np.abs(ref).max() > 1e-3, "the fp32 reference must be meaningful"
    theirs = grappler_bf16(frozen.graph_def, frozen.fetch_nodes)
    tf_err = rel_error(run_graph(theirs, feeds, frozen.outputs)[0], ref)
    return frozen, feeds, ref, theirs, tf_err


def test_tf_lists_convert_at_least_as_much_as_grappler_with_no_more_casts(model):
    frozen, feeds, ref, theirs, tf_err = model
    ours, plan = rewrite_with_plan(frozen.graph_def, TF_LISTS, frozen.fetch_nodes)
    y = run_graph(ours, feeds, frozen.outputs)[0]  # imports and runs, or the test fails here
    assert y.dtype == ref.dtype == np.float32
    err = rel_error(y, ref)
    assert err <= 1.5 * tf_err + 1e-6, (frozen.name, err, tf_err)
    assert low_nodes(ours, BF16) >= low_nodes(theirs, BF16), frozen.name
    assert runtime_casts(ours) <= runtime_casts(theirs), frozen.name


def test_ascend910b_float16_emulated_runs_and_is_as_accurate(model):
    frozen, feeds, ref, theirs, tf_err = model
    ours, plan = rewrite_with_plan(frozen.graph_def, ASCEND, frozen.fetch_nodes)
    assert plan.config.get("float16") == "emulated"
    y = run_graph(ours, feeds, frozen.outputs)[0]
    assert y.dtype == np.float32
    err = rel_error(y, ref)
    assert err <= 1.5 * tf_err + 1e-6, (frozen.name, err, tf_err)
    assert len(plan.converted()) > 0
    # emulation: float16 tensors between float32 kernels, so no computing node runs a float16 kernel
    halves = [n.name for n in ours.node if n.op not in ("Cast", "Const") and n.attr["T"].type == 19
              and n.op not in ("Identity", "IdentityN", "Reshape", "Pad", "ConcatV2", "Squeeze", "ExpandDims",
                               "Transpose", "StridedSlice", "Pack", "Split", "SplitV", "GatherV2", "Enter",
                               "Exit", "Merge", "Switch", "NextIteration", "Slice", "Tile", "SelectV2")]
    assert not halves, halves[:5]
