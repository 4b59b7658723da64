"""pp.tune on Keras models and TensorFlow graphs (frozen GraphDef, .pb file, SavedModel), with a real trained
digits CNN whose last Dense is bf16-sensitive.

The sensitive layer is made as tests/digits_models.py makes the torch one: 2**14 is added to the last
Dense's bias, so every logit carries the same large offset. float32 argmax is unchanged; bfloat16 (8
significant bits) rounds logits near 16384 in steps of 128, every logit of a sample to the same value,
and accuracy falls to chance. In the frozen GraphDef that Dense is two nodes, ``MatMul`` then ``BiasAdd``:
the offset is added by the BiasAdd, so the BiasAdd is the node that must keep float32 (keeping the MatMul
alone leaves the rounding in place: checked below), and the MatMul may stay bfloat16.

Trials are counted as tests/test_tune_torch.py counts them: without the baseline (trial 1 is the full
conversion), so the issue's bound reads 1 + ceil(log2(candidates)) + 2.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("sklearn")

from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow.convert import load_model, rewrite  # noqa: E402
from precision_policy.backends.tensorflow.keras import apply  # noqa: E402
from precision_policy.backends.tensorflow.tune import (  # noqa: E402
    GraphModel,
    GraphTuneAdapter,
    KerasTuneAdapter,
    adapter_for,
)
from precision_policy.rules import Rule  # noqa: E402

CFG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
OFFSET = 2.0**14
SENSITIVE = "logits"  # the last Dense's layer name


def bound(n: int) -> int:
    return 1 + math.ceil(math.log2(n)) + 2


def make_cnn(name: str = "digits") -> Any:
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2, name="pool1"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="fc1"),
        keras.layers.Dense(10, name=SENSITIVE),
    ], name=name)


@dataclass
class Digits:
    model: Any  # the trained fp32 model (not sensitive)
    sensitive: Any  # a copy whose last Dense carries the offset
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def accuracy(self, model: Any) -> float:
        """Keras models (predict) and GraphModels (called)."""
        if isinstance(model, GraphModel):
            logits = model(self.x_test)
        else:
            logits = model.predict(self.x_test, batch_size=512, verbose=0)
        return float((np.argmax(logits, 1) == self.y_test).mean())


def copy_of(model: Any) -> Any:
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


@pytest.fixture(scope="module")
def digits() -> Digits:
    """Trained in float32 for 15 epochs (seeded; a few seconds)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[..., None] / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    tr, te = perm[:1300], perm[1300:]
    keras.utils.set_random_seed(0)
    model = make_cnn()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[tr], y[tr], batch_size=100, epochs=15, verbose=0, shuffle=True)
    sensitive = copy_of(model)
    w, b = sensitive.get_layer(SENSITIVE).get_weights()
    sensitive.get_layer(SENSITIVE).set_weights([w, b + OFFSET])
    return Digits(model, sensitive, x[tr], y[tr], x[te], y[te])


@dataclass
class Frozen:
    graph_def: Any
    inputs: list[str]
    outputs: list[str]
    matmul: str
    bias_add: str


def freeze(model: Any) -> Frozen:
    """As tests/tf_models.py freezes Keras models (convert_variables_to_constants_v2)."""
    spec = tf.TensorSpec([None, 8, 8, 1], tf.float32)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(fn)
    gd = frozen.graph.as_graph_def()
    nodes = [n for n in gd.node if f"/{SENSITIVE}" in n.name]
    matmul = next(n.name for n in nodes if n.op == "MatMul")
    bias_add = next(n.name for n in nodes if n.op == "BiasAdd")
    return Frozen(gd, [t.name for t in frozen.inputs], [t.name for t in frozen.outputs], matmul, bias_add)


@pytest.fixture(scope="module")
def frozen(digits: Digits) -> Frozen:
    return freeze(digits.sensitive)


def policies(model: Any) -> dict[str, str]:
    return {layer.name: layer.dtype_policy.name for layer in model.layers}


# ---------------------------------------------------------------------- the model really is bf16-sensitive
def test_full_bf16_really_destroys_accuracy(digits, frozen):
    base = digits.accuracy(digits.sensitive)
    assert base > 0.95
    assert digits.accuracy(digits.model) == base  # the offset leaves fp32 argmax unchanged
    assert digits.accuracy(apply(copy_of(digits.sensitive), CFG)) < 0.2  # chance is 0.1
    graph = GraphModel(frozen.graph_def, frozen.outputs, frozen.inputs)
    assert digits.accuracy(graph) == base
    assert digits.accuracy(GraphModel(rewrite(frozen.graph_def, CFG, frozen.outputs), frozen.outputs)) < 0.2


# ---------------------------------------------------------------------- Keras
def test_tune_keras_keeps_exactly_the_sensitive_layer(digits, caplog):
    caplog.set_level(logging.INFO, logger="precision_policy.tune")
    model = digits.sensitive
    before = [w.copy() for w in model.get_weights()]
    result = pp.tune(model, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    n = len(result.candidates)
    assert n == 6 and {c.name for c in result.candidates} == {"conv1", "pool1", "conv2", "flatten", "fc1", SENSITIVE}
    assert result.keep_dtype == [SENSITIVE] and result.converted == n - 1
    assert abs(result.best - result.baseline) <= 0.01 * result.baseline
    assert abs(digits.accuracy(result.model) - result.baseline) <= 0.01 * result.baseline
    assert len(result.trials) <= bound(n), [t.to_dict() for t in result.trials]
    assert result.trials[0].keep_dtype == () and not result.trials[0].passed
    top = max(result.sensitivity.values(), key=lambda s: s.score)
    assert top.name == SENSITIVE and top.measured and top.rel_error > 0.5
    assert all(s.rel_error < 0.05 for s in result.sensitivity.values() if s.name != SENSITIVE)
    # the winner: a copy with its policies set; the user's model is untouched
    assert result.model is not model and result.plan is result.model.precision_plan
    assert result.plan[SENSITIVE].dtype == "float32" and result.plan["fc1"].dtype == "bfloat16"
    assert policies(result.model) == {"conv1": "mixed_bfloat16", "pool1": "mixed_bfloat16", "conv2": "mixed_bfloat16",
                                      "flatten": "mixed_bfloat16", "fc1": "mixed_bfloat16", SENSITIVE: "float32"}
    assert set(policies(model).values()) == {"float32"} and not hasattr(model, "precision_plan")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert "predict" not in model.__dict__ and "call" not in model.__dict__
    text = caplog.text
    assert "passed" in text and "failed" in text and "op type" in text and "MatMul" in text
    assert f"{n - 1} of {n} ops converted" in text


def test_keras_calibration_batch_comes_from_the_baseline_predict(digits):
    adapter = KerasTuneAdapter(digits.sensitive, CFG)
    assert digits.accuracy(adapter.baseline()) > 0.95  # eval_fn's predict(x_test): its first 256 rows recorded
    adapter.baseline_done()
    assert "predict" not in digits.sensitive.__dict__
    assert adapter._inputs is not None and adapter._inputs.shape == (256, 8, 8, 1)
    sens = adapter.sensitivity()
    assert max(sens.values(), key=lambda s: s.score).name == SENSITIVE
    result = pp.tune(digits.sensitive, CFG, digits.accuracy, tolerable_loss=0.01)
    assert result.keep_dtype == [SENSITIVE] and len(result.trials) <= bound(len(result.candidates))


def test_keras_nested_model_names_layers_by_path(digits):
    """The sensitive Dense inside a nested Sequential: kept as 'head/logits', measured through the nested call."""
    trained = digits.sensitive
    head = keras.Sequential([keras.Input((256,)), keras.layers.Dense(32, activation="relu", name="fc1"),
                             keras.layers.Dense(10, name=SENSITIVE)], name="head")
    x = keras.Input((8, 8, 1), name="image")
    h = x
    for name in ("conv1", "pool1", "conv2", "flatten"):
        h = trained.get_layer(name).__class__.from_config(trained.get_layer(name).get_config())(h)
    model = keras.Model(x, head(h), name="nested")
    for name in ("conv1", "conv2"):
        model.get_layer(name).set_weights(trained.get_layer(name).get_weights())
    for name in ("fc1", SENSITIVE):
        head.get_layer(name).set_weights(trained.get_layer(name).get_weights())
    assert digits.accuracy(model) == digits.accuracy(trained)
    result = pp.tune(model, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    assert result.keep_dtype == [f"head/{SENSITIVE}"]
    assert max(result.sensitivity.values(), key=lambda s: s.score).name == f"head/{SENSITIVE}"
    assert len(result.trials) <= bound(len(result.candidates))
    assert result.model.get_layer("head").get_layer(SENSITIVE).dtype_policy.name == "float32"
    assert result.model.get_layer("head").get_layer("fc1").dtype_policy.name == "mixed_bfloat16"


def test_keras_no_sensitive_op_passes_in_one_trial(digits):
    result = pp.tune(digits.model, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:32])
    assert len(result.trials) == 1 and result.trials[0].passed
    assert result.keep_dtype == [] and result.converted == len(result.candidates) == 6
    assert result.sensitivity == {}  # the full conversion passed: no ranking needed


def test_keras_save_reproduces_the_winner(digits, tmp_path):
    result = pp.tune(digits.sensitive, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    out = result.save(tmp_path / "tuned")
    assert sorted(p.name for p in out.iterdir()) == ["keep_dtype.txt", "plan.json", "trials.json"]
    assert [ln for ln in (out / "keep_dtype.txt").read_text().splitlines() if not ln.startswith("#")] == [SENSITIVE]
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", keep_dtype=out / "keep_dtype.txt")
    again = apply(copy_of(digits.sensitive), cfg)
    assert digits.accuracy(again) == result.best
    saved = pp.CastPlan.from_json(out / "plan.json")
    assert again.precision_plan.dtype == saved.dtype and again.precision_plan.names == saved.names
    recorded = json.loads((out / "trials.json").read_text())
    assert recorded["framework"] == "keras" and recorded["keep_dtype"] == [SENSITIVE]


# ---------------------------------------------------------------------- frozen GraphDef
def test_tune_graphdef_keeps_the_bias_add_of_the_sensitive_dense(digits, frozen, caplog):
    caplog.set_level(logging.INFO, logger="precision_policy.tune")
    result = pp.tune(frozen.graph_def, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    n = len(result.candidates)
    names = [c.name for c in result.candidates]
    assert n >= 15 and frozen.matmul in names and frozen.bias_add in names
    assert not any(c.op_type in ("Const", "Placeholder") or c.name.endswith("ReadVariableOp") for c in result.candidates)
    assert result.keep_dtype == [frozen.bias_add] and result.converted == n - 1
    assert abs(result.best - result.baseline) <= 0.01 * result.baseline
    assert len(result.trials) <= bound(n), [t.to_dict() for t in result.trials]
    assert result.trials[0].keep_dtype == () and not result.trials[0].passed
    ranked = sorted(result.sensitivity.values(), key=lambda s: s.score, reverse=True)
    # the error the BiasAdd adds ranks it first; the fetched Identity that passes it on adds none
    assert ranked[0].name == frozen.bias_add and ranked[0].rel_error > 0.5 and ranked[1].rel_error < 0.05
    assert result.sensitivity["Identity"].rel_error < 0.01
    # the winner: a GraphModel of the rewritten GraphDef; the MatMul stays bfloat16
    model = result.model
    assert isinstance(model, GraphModel) and model.fetches == frozen.outputs and model.inputs == frozen.inputs
    assert abs(digits.accuracy(model) - result.baseline) <= 0.01 * result.baseline
    assert result.plan[frozen.bias_add].dtype == "float32" and result.plan[frozen.matmul].dtype == "bfloat16"
    by_name = {n.name: n for n in model.graph_def.node}
    assert by_name[frozen.matmul].attr["T"].type == tf.bfloat16.as_datatype_enum
    assert by_name[frozen.bias_add].attr["T"].type == tf.float32.as_datatype_enum
    assert model.graph.get_tensor_by_name(frozen.outputs[0]).dtype == tf.float32
    assert f"{n - 1} of {n} ops converted" in caplog.text


def test_graphdef_keeping_the_bias_add_beats_keeping_the_matmul(digits, frozen):
    """Both one-node keep sets pass, but keeping the MatMul drags the gray BiasAdd after it into float32 and runs
    the MatMul itself in float32; keeping the BiasAdd (where the offset is added) leaves the MatMul bfloat16."""
    adapter = GraphTuneAdapter(frozen.graph_def, CFG, fetches=frozen.outputs)
    base = digits.accuracy(digits.sensitive)
    matmul_only, plan_m = adapter.build(frozenset({frozen.matmul}))
    assert plan_m[frozen.matmul].dtype == "float32" and plan_m[frozen.bias_add].dtype == "float32"
    assert plan_m[frozen.bias_add].rule == Rule.GRAY_FOLLOWS
    bias_only, plan_b = adapter.build(frozenset({frozen.bias_add}))
    assert plan_b[frozen.matmul].dtype == "bfloat16" and plan_b[frozen.bias_add].dtype == "float32"
    assert digits.accuracy(bias_only) >= 0.99 * base and digits.accuracy(matmul_only) >= 0.99 * base
    assert len(plan_b.converted()) > len(plan_m.converted())
    # the BiasAdd is gray: with its MatMul in bfloat16 and everything else kept, it follows the MatMul and rounds
    everything_else = frozenset(c.name for c in adapter.candidates()) - {frozen.bias_add, frozen.matmul}
    last_low, plan = adapter.build(everything_else)
    assert plan[frozen.bias_add].dtype == "bfloat16" and digits.accuracy(last_low) < 0.2


def test_graphdef_save_resume_and_reproduce(digits, frozen, tmp_path):
    result = pp.tune(frozen.graph_def, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    out = result.save(tmp_path / "tuned")
    assert [ln for ln in (out / "keep_dtype.txt").read_text().splitlines() if not ln.startswith("#")] == [frozen.bias_add]
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", keep_dtype=out / "keep_dtype.txt")
    again = rewrite(frozen.graph_def, cfg, frozen.outputs)
    assert digits.accuracy(GraphModel(again, frozen.outputs)) == result.best
    assert again.SerializeToString(deterministic=True) == result.model.graph_def.SerializeToString(deterministic=True)

    calls = []

    def counted(model):
        calls.append(1)
        return digits.accuracy(model)

    resumed = pp.tune(frozen.graph_def, CFG, counted, tolerable_loss=0.01, example_inputs=digits.x_train[:64],
                      resume=out / "trials.json")
    assert len(calls) == 1 and resumed.keep_dtype == result.keep_dtype and all(t.replayed for t in resumed.trials)
    other = pp.RunConfig(precision_mode="allow_mix_precision", op_info="tf_amp_bf16")
    with pytest.raises(pp.TuneError, match="another model or config"):
        pp.tune(frozen.graph_def, other, digits.accuracy, example_inputs=digits.x_train[:64], resume=out / "trials.json")


def test_graph_calibration_batch_comes_from_the_baseline_call(digits, frozen):
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph_def, name="")
    result = pp.tune(graph, CFG, digits.accuracy, tolerable_loss=0.01)  # a tf.Graph; fetches found as convert finds them
    assert result.keep_dtype == [frozen.bias_add]
    assert result.sensitivity and max(result.sensitivity.values(), key=lambda s: s.score).score > 0.5
    assert len(result.trials) <= bound(len(result.candidates))


def test_graph_no_sensitive_op_passes_in_one_trial(digits):
    plain = freeze(digits.model)
    result = pp.tune(GraphModel(plain.graph_def, plain.outputs, plain.inputs), CFG, digits.accuracy,
                     example_inputs={plain.inputs[0]: digits.x_train[:32]})
    assert len(result.trials) == 1 and result.trials[0].passed and result.keep_dtype == []


def test_pb_file_and_saved_model_paths(digits, frozen, tmp_path):
    pb = tmp_path / "digits.pb"
    pb.write_bytes(frozen.graph_def.SerializeToString())
    result = pp.tune(pb, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    assert result.keep_dtype == [frozen.bias_add]

    saved = tmp_path / "saved"
    digits.sensitive.export(str(saved), verbose=False)
    result = pp.tune(str(saved), CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    assert len(result.keep_dtype) == 1, result.keep_dtype
    (kept,) = result.keep_dtype
    assert result.plan[kept].op_type == "BiasAdd" and f"{SENSITIVE}" in kept
    assert len(result.trials) <= bound(len(result.candidates))
    model = result.model
    assert list(model.input_keys) and abs(digits.accuracy(model) - result.baseline) <= 0.01 * result.baseline
    key = next(iter(model.input_keys))
    assert np.array_equal(model({key: digits.x_test[:5]}), model(digits.x_test[:5]))  # signature keys feed too
    # the saved keep_dtype.txt reproduces it on the frozen signature graph
    out = result.save(tmp_path / "tuned")
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", keep_dtype=out / "keep_dtype.txt")
    loaded = load_model(saved, all_signatures=False)
    sig = next(iter(loaded.signatures.values()))
    again = GraphModel(rewrite(sig.graph_def, cfg, sig.fetches), sig.fetches, [name for _, name, _ in sig.inputs])
    assert digits.accuracy(again) == result.best


def test_keras_file_path(digits, tmp_path):
    path = tmp_path / "digits.keras"
    digits.sensitive.save(path)
    result = pp.tune(path, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    assert result.framework == "keras" and result.keep_dtype == [SENSITIVE]


# ---------------------------------------------------------------------- dispatch
def test_adapter_for_dispatch(digits, frozen):
    assert adapter_for(object(), CFG) is None
    assert adapter_for("not-a-model.txt", CFG) is None
    assert isinstance(adapter_for(digits.model, CFG), KerasTuneAdapter)
    assert isinstance(adapter_for(frozen.graph_def, CFG, fetches=frozen.outputs), GraphTuneAdapter)
    with pytest.raises(pp.ConfigError, match="route='fx' is for torch"):
        adapter_for(digits.model, CFG, route="fx")
    with pytest.raises(pp.ConfigError, match="unknown option"):
        adapter_for(digits.model, CFG, fetches=["x"])
    with pytest.raises(pp.ConfigError, match="unknown option"):
        adapter_for(frozen.graph_def, CFG, bogus=1)


def test_fingerprint_is_stable_and_tells_models_and_configs_apart(digits, frozen):
    a = GraphTuneAdapter(frozen.graph_def, CFG).fingerprint()
    assert a == GraphTuneAdapter(frozen.graph_def, CFG).fingerprint()
    other = pp.RunConfig(precision_mode="allow_mix_precision", op_info="tf_amp_bf16")
    assert a != GraphTuneAdapter(frozen.graph_def, other).fingerprint()
    k = KerasTuneAdapter(digits.sensitive, CFG).fingerprint()
    assert k == KerasTuneAdapter(copy_of(digits.sensitive), CFG).fingerprint() and k != a


def test_graph_model_feeds(frozen, digits):
    model = GraphModel(frozen.graph_def, frozen.outputs)
    x = digits.x_test[:4]
    assert model.inputs == frozen.inputs
    by_node = model({frozen.inputs[0].split(":")[0]: x})
    assert np.array_equal(by_node, model(x)) and by_node.shape == (4, 10)
    with pytest.raises(pp.ConfigError, match="2 input"):
        model(x, x)
    model.close()
    assert model(x).shape == (4, 10)  # a new session after close
