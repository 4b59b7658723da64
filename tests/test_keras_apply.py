"""Keras 3 apply on real models: a nested backbone, a transformer encoder, recurrent and custom
layers, a model that already ran, and float16 emulated or native. Every applied model runs
(predict and one fit epoch) and its outputs are compared with the float32 model."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import precision_policy as pp  # noqa: E402
from precision_policy.errors import GraphError, OverrideError  # noqa: E402
from precision_policy.keras import apply, layer_graph  # noqa: E402
from precision_policy.opinfo import load_library, shipped_root  # noqa: E402
from precision_policy.rules import Rule  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
F16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False)
LOGGER = "precision_policy.backends.tensorflow.keras"


def assert_low_precision_close(got: np.ndarray, ref: np.ndarray, tol: float = 0.05) -> None:
    """Within ``tol`` of the float32 output (relative to its largest value), and not identical:
    an identical output would mean the low precision never ran."""
    got = np.asarray(got, dtype=np.float32)
    err, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    assert np.isfinite(got).all()
    assert 0 < err <= tol * scale, (err, scale)


def fit_one_epoch(model: keras.Model, x: np.ndarray, y: np.ndarray, loss: str = "mse", *, run_eagerly: bool = False) -> float:
    model.compile(keras.optimizers.Adam(1e-3), loss, run_eagerly=run_eagerly)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    loss_value = history.history["loss"][-1]
    assert np.isfinite(loss_value)
    for w in model.weights:
        assert w.dtype == "float32", w.path  # master weights stay float32
    return loss_value


def policies(layer: keras.layers.Layer) -> dict[str, str]:
    return {sub.name: sub.dtype_policy.name for sub in layer._flatten_layers(include_self=False)}


# ---------------------------------------------------------------------- a nested backbone
def backbone_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35,
                                              name="backbone")
    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(image))
    return keras.Model(image, keras.layers.Dense(10, name="logits")(x), name="classifier")


def test_backbone_layers_are_nodes_named_by_path_and_the_model_trains(tmp_path):
    model = backbone_model()
    backbone = model.get_layer("backbone")
    g = layer_graph(model)
    assert g.node("backbone/Conv1").op_type == "Conv2D" and g.node("backbone/Conv1").inputs == ["image:0"]
    assert g.node("backbone/block_1_depthwise").op_type == "DepthwiseConv2D"
    assert g.node("pool").inputs == ["backbone/out_relu:0"]
    assert len(g) == len(backbone.layers) + 2  # the backbone's own Input is the model's input

    x = np.random.RandomState(0).rand(32, 32, 32, 3).astype("float32")
    ref = model.predict(x, verbose=0)
    keep = tmp_path / "keep.txt"
    keep.write_text("backbone/Conv1\n")
    apply(model, BF16.model_copy(update={"keep_dtype": keep}))
    plan = model.precision_plan
    assert plan["backbone/Conv1"].rule is Rule.KEEP_DTYPE and "keep.txt:1" in plan["backbone/Conv1"].reason
    inner = policies(backbone)
    assert inner["Conv1"] == "float32"
    assert inner["block_1_expand"] == inner["block_1_depthwise"] == inner["block_16_project"] == "mixed_bfloat16"
    bn = plan["backbone/block_1_expand_BN"]
    assert (bn.rule, bn.followed) == (Rule.GRAY_FOLLOWS, "backbone/block_1_expand")
    assert backbone.dtype_policy.name == "float32"  # the container only passes values on
    assert model.get_layer("logits").dtype_policy.name == "mixed_bfloat16"
    assert_low_precision_close(model.predict(x, verbose=0), ref, tol=0.1)
    # eagerly: tracing MobileNetV2's training step takes 20 s on 2 cores and tests nothing the policies change
    # (graph-mode fit under these policies: tests/test_keras.py and the Keras demo)
    fit_one_epoch(model, x, np.arange(32) % 10, "sparse_categorical_crossentropy", run_eagerly=True)

    keep.write_text("backbone/conv1\n")  # a name that matches nothing is an error, with the close name
    with pytest.raises(OverrideError, match=r"keep\.txt:1: keep_dtype: 'backbone/conv1' matches no layer.*"
                                            r"did you mean 'backbone/Conv1'"):
        apply(model, BF16.model_copy(update={"keep_dtype": keep}))


# ---------------------------------------------------------------------- a transformer encoder
def encoder(vocab: int = 50, length: int = 8, width: int = 16) -> keras.Model:
    keras.utils.set_random_seed(0)
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, width, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(2, 8, dropout=0.1, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add(name="res1")([x, a]))
    f = keras.layers.Dense(32, activation="gelu", name="ff1")(x)
    f = keras.layers.Dense(width, name="ff2")(f)
    x = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add(name="res2")([x, f]))
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(tokens, keras.layers.Dense(2, name="head")(x), name="encoder")


def test_transformer_encoder_plans_attention_through_its_sublayers(tmp_path):
    model = encoder()
    tokens = np.random.RandomState(0).randint(0, 50, (32, 8)).astype("int32")
    ref = model.predict(tokens, verbose=0)
    apply(model, BF16)
    plan = model.precision_plan
    for proj in ("query", "key", "value", "attention_output"):
        assert plan[f"mha/{proj}"].op_type == "Einsum" and plan[f"mha/{proj}"].rule is Rule.WHITE
    assert plan["mha"].op_type == "MultiHeadAttention" and plan["mha"].dtype == "bfloat16"
    mha = model.get_layer("mha")
    softmax = plan[f"mha/{mha._softmax.name}"]  # Keras names it: softmax, softmax_1, ...
    assert softmax.op_type == "Softmax" and (softmax.rule, softmax.followed) == (Rule.GRAY_FOLLOWS, "mha")  # gray (infer) in TF's list
    assert set(policies(mha).values()) == {"mixed_bfloat16"} and mha.dtype_policy.name == "mixed_bfloat16"
    assert plan["ln1"].rule is Rule.BLACK and model.get_layer("ln1").dtype_policy.name == "float32"
    assert plan["res1"].dtype == "float32"  # float32 embedding + bfloat16 attention: the widest
    assert model.get_layer("ff1").dtype_policy.name == "mixed_bfloat16"
    assert_low_precision_close(model.predict(tokens, verbose=0), ref)

    keep = tmp_path / "keep.txt"
    keep.write_text("mha/value\n")
    apply(model, BF16.model_copy(update={"keep_dtype": keep}))  # applying again starts from the origin
    assert mha._value_dense.dtype_policy.name == "float32" and mha._query_dense.dtype_policy.name == "mixed_bfloat16"
    assert model.precision_plan["mha/value"].rule is Rule.KEEP_DTYPE and "keep.txt:1" in model.precision_plan["mha/value"].reason
    assert_low_precision_close(model.predict(tokens, verbose=0), ref)
    fit_one_epoch(model, tokens, tokens[:, 0] % 2, "sparse_categorical_crossentropy")

    keep.write_text("mha/quer\n")
    with pytest.raises(OverrideError, match="did you mean 'mha/query'"):
        apply(model, BF16.model_copy(update={"keep_dtype": keep}))


# ---------------------------------------------------------------------- recurrent, custom and unknown layers
class Scale(keras.layers.Layer):
    """A custom layer without sublayers: an op type no library knows."""

    def build(self, shape: tuple) -> None:
        self.s = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x * self.s


class Residual(keras.layers.Layer):
    """A custom layer with sublayers, adding with TensorFlow's ``+`` (both sides must have one dtype)."""

    def __init__(self, units: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(units, name="inner")
        self.act = keras.layers.ReLU(name="act")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x + self.act(self.inner(x))


def recurrent_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    seq = keras.Input((6, 4), name="seq")
    x = keras.layers.Bidirectional(keras.layers.LSTM(8, return_sequences=True), name="bilstm")(seq)
    x = keras.layers.GRU(8, return_sequences=True, name="gru")(x)
    x = Residual(8, name="res")(x)
    x = Scale(name="scale")(x)
    x = keras.layers.Lambda(lambda v: v * 2.0, name="double")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(seq, keras.layers.Dense(3, name="head")(x), name="recurrent")


def test_recurrent_custom_and_unknown_layers(caplog):
    model = recurrent_model()
    x = np.random.RandomState(0).randn(32, 6, 4).astype("float32")
    ref = model.predict(x, verbose=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply(model, BF16)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    assert lines[0].startswith("3 layer(s) kept in float32, op type unknown to library tf_amp_bf16: "
                               "res (keras:Residual), scale (keras:Scale), double (keras:Lambda);")
    plan = model.precision_plan
    assert plan.unknown == {"keras:Residual": ["res"], "keras:Scale": ["scale"], "keras:Lambda": ["double"]}
    # recurrent layers are one node; their cells take its dtype
    assert plan["bilstm"].op_type == "DynamicRNN" and plan["gru"].op_type == "DynamicGRUV2"
    bilstm = model.get_layer("bilstm")
    assert {bilstm.forward_layer.cell.dtype_policy.name, bilstm.backward_layer.cell.dtype_policy.name,
            model.get_layer("gru").cell.dtype_policy.name} == {"mixed_bfloat16"}
    # the custom composite: its Dense runs low, its own add stays float32 (unknown op type)
    assert plan["res/inner"].rule is Rule.WHITE and (plan["res/act"].rule, plan["res/act"].followed) == (Rule.GRAY_FOLLOWS, "res/inner")
    res = model.get_layer("res")
    assert res.inner.dtype_policy.name == "mixed_bfloat16" and res.dtype_policy.name == "float32"
    assert plan["res"].inputs == ("float32", "float32")  # reads gru (cast by its policy) and res/act
    assert model.get_layer("scale").dtype_policy.name == "float32"
    # runs: the bfloat16 output of res/act is cast to float32 for the layer's own `+`
    assert_low_precision_close(model.predict(x, verbose=0), ref)
    fit_one_epoch(model, x, np.zeros((32, 3), "float32"))


def test_subclassed_model_needs_a_functional_wrapper():
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.fc = keras.layers.Dense(2, name="fc")

        def call(self, x: tf.Tensor) -> tf.Tensor:
            return self.fc(x)

    with pytest.raises(GraphError, match="subclassed model"):
        layer_graph(Net())
    inp = keras.Input((3,), name="x")
    g = layer_graph(keras.Model(inp, Net()(inp)))
    assert g.node("net/fc").op_type == "MatMul" and g.node("net/fc").inputs == ["x:0"]


class Twice(keras.layers.Layer):
    """A composite that calls its one sublayer twice, on its own output."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.fc = keras.layers.Dense(4, name="fc")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self.fc(self.fc(x))


class Picky(keras.layers.Layer):
    """A composite that refuses the placeholder batch of 2 the trace uses."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.fc = keras.layers.Dense(4, name="fc")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        if x.shape[0] == 2:
            raise ValueError("no batch of 2")
        return self.fc(x)


def test_shared_towers_keras_ops_and_an_untraceable_composite(caplog, tmp_path):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="e")], name="inner")
    tower = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d"), inner], name="tower")
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    s = keras.ops.cast(keras.ops.abs(tower(a) - tower(b)), "float32")
    out = keras.layers.Dense(1, name="out")(Picky(name="picky")(Twice(name="twice")(s)))
    model = keras.Model([a, b], out)
    g = layer_graph(model)
    assert g.node("tower/d").inputs == ["a:0", "b:0"]  # one node for a layer called twice
    assert g.node("tower/inner/e").inputs == ["tower/d:0"]
    assert g.node("twice/fc").inputs[0].startswith("cast")  # its call on its own output adds no cycle
    assert len(g.node("twice/fc").inputs) == 1
    x = [np.random.RandomState(k).randn(16, 4).astype("float32") for k in (0, 1)]
    ref = model.predict(x, verbose=0)
    caplog.clear()  # layer_graph above warned once already
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply(model, BF16)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == ["could not trace composite layer picky (ValueError: no batch of 2); planned as one node whose "
                     "sublayers take its dtype",
                     "1 layer(s) kept in float32, op type unknown to library tf_amp_bf16: picky (keras:Picky); add "
                     "them to the library or map them in opinfo_db/aliases/keras.json"]
    plan = model.precision_plan
    # Keras ops are not layers (their names count up per session): they follow their inputs,
    # except a cast, which writes the dtype it names
    ops = {d.name.rstrip("_0123456789"): d for d in plan if d.op_type in ("Identity", "keras:op.Cast")}
    assert sorted(ops) == ["absolute", "cast", "subtract"]
    assert (ops["subtract"].rule, ops["subtract"].followed) == (Rule.GRAY_FOLLOWS, "tower/inner/e") and ops["subtract"].dtype == "bfloat16"
    assert (ops["absolute"].rule, ops["absolute"].followed) == (Rule.GRAY_FOLLOWS, ops["subtract"].name)
    assert ops["absolute"].dtype == "bfloat16"
    assert ops["cast"].op_type == "keras:op.Cast" and ops["cast"].dtype == "float32"
    picky = model.get_layer("picky")
    assert picky.fc.dtype_policy.name == picky.dtype_policy.name == "float32"
    assert model.get_layer("twice").fc.dtype_policy.name == "mixed_bfloat16"
    assert_low_precision_close(model.predict(x, verbose=0), ref)
    fit_one_epoch(model, x, np.zeros((16, 1), "float32"))
    keep = tmp_path / "keep.txt"
    keep.write_text(ops["subtract"].name + "\n")  # an op without a policy cannot keep a dtype
    with pytest.raises(OverrideError, match="is a Keras operation, not a layer"):
        apply(model, BF16.model_copy(update={"keep_dtype": keep}))


# ---------------------------------------------------------------------- a model that already ran
def test_apply_after_predict_and_fit_runs_the_new_policies():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,), name="x")
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inp)
    model = keras.Model(inp, keras.layers.Dense(4, name="out")(hidden))
    x = np.random.RandomState(0).randn(64, 16).astype("float32")
    fit_one_epoch(model, x, np.zeros((64, 4), "float32"))
    ref = model.predict(x, verbose=0)
    assert model.predict_function is not None and model.train_function is not None
    apply(model, BF16)
    assert model.predict_function is None and model.train_function is None and model.test_function is None
    got = model.predict(x, verbose=0)
    assert_low_precision_close(got, ref)  # the cached float32 function would give ref exactly
    probe = keras.Model(inp, hidden).predict(x, verbose=0)
    assert probe.dtype == tf.bfloat16.as_numpy_dtype
    fit_one_epoch(model, x, np.zeros((64, 4), "float32"))


# ---------------------------------------------------------------------- float16: emulated or native
def test_float16_is_emulated_on_cpu_unless_native():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,), name="x")
    fc = keras.layers.Dense(8, name="fc")
    h = fc(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.ReLU(name="act")(h)))
    fc.bias.assign(np.random.RandomState(1).randn(8).astype("float32") * 0.1)
    kernel, bias = fc.kernel.numpy(), fc.bias.numpy()
    x = np.eye(16, dtype="float32")  # one-hot rows: fc's output is a kernel row plus the bias
    ref = keras.Model(inp, h).predict(x, verbose=0)
    ref_model = model.predict(x, verbose=0)

    apply(model, F16)
    plan = model.precision_plan
    assert plan.config["float16"] == "emulated" and plan["fc"].dtype == "float16"
    assert fc.compute_dtype == "float32" and fc.dtype_policy.name == "float32"
    got = keras.Model(inp, h).predict(x, verbose=0)
    f16 = lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    assert got.dtype == np.float32 and np.array_equal(got, f16(got))  # stored as float16 values
    # the kernel and bias were read as float16 values, added in float32, the sum rounded
    assert np.array_equal(got, f16(f16(kernel) + f16(bias)))
    assert not np.array_equal(got, f16(kernel + bias))
    assert_low_precision_close(got, ref, tol=2e-3)
    assert_low_precision_close(model.predict(x, verbose=0), ref_model, tol=2e-3)
    fit_one_epoch(model, np.random.RandomState(2).randn(32, 16).astype("float32"), np.zeros((32, 3), "float32"))
    emulated = keras.Model(inp, h).predict(x, verbose=0)
    assert not np.array_equal(emulated, got)  # it trained

    apply(model, F16.model_copy(update={"native_fp16": True}))
    assert model.precision_plan.config["float16"] == "native"
    assert fc.compute_dtype == "float16" and fc.dtype_policy.name == "mixed_float16"
    assert "call" not in fc.__dict__  # the emulation hook is gone
    native = keras.Model(inp, h).predict(x, verbose=0)
    assert native.dtype == np.float16
    # TensorFlow's float16 kernels give the values emulation gave (exact sums of one-hot rows)
    np.testing.assert_array_equal(native.astype(np.float32), emulated)
    np.testing.assert_array_equal(emulated, f16(f16(fc.kernel.numpy()) + f16(fc.bias.numpy())))

    apply(model, BF16.model_copy(update={"precision_mode": "force_fp32", "op_info": "ascend910b"}))
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


# ---------------------------------------------------------------------- the alias table and the libraries
def test_keras_alias_targets_are_known_to_the_libraries():
    table = json.loads((shipped_root() / "aliases" / "keras.json").read_text())
    targets = set(table["layers"].values()) | set(table["activations"].values())
    for name in ("ascend910", "ascend910b"):
        lib = load_library(name)
        assert sorted(t for t in targets - {"Placeholder"} if t not in lib) == [], name
    for layer in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "Dropout", "Flatten", "GroupNormalization",
                  "LayerNormalization", "LSTM", "GRU", "MultiHeadAttention", "PReLU"):
        assert layer in table["layers"], layer
    for act in ("swish", "silu", "gelu", "hard_sigmoid", "mish"):
        assert act in table["activations"], act
    expect = {"white": ["MultiHeadAttention", "DynamicRNN", "DynamicGRUV2", "Conv2DTranspose", "Conv3DTranspose"],
              "black": ["LayerNorm", "GroupNorm"],
              "gray": ["Gelu", "Swish", "Mish", "HardSigmoid", "PRelu", "Dropout", "Flatten"]}
    for name in ("tf_amp_bf16", "tf_amp_fp16"):
        lib = load_library(name)
        for flag, ops in expect.items():
            assert [o for o in ops if lib[o].flag != flag] == [], (name, flag)
    assert load_library("tf_amp_fp16")["L2Normalize"].flag == "black"  # TF's float16 list denies Sum
    assert load_library("tf_amp_bf16")["L2Normalize"].flag == "gray"  # and its bfloat16 list infers it
