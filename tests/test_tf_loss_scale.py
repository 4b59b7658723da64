"""Loss scaling in TensorFlow: Keras (GradientTape and model.fit) and TF1 session training, with planted overflows."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import precision_policy as pp  # noqa: E402
from precision_policy.keras import LossScaleOptimizer, apply  # noqa: E402
from precision_policy.loss_scale import DynamicLossScale  # noqa: E402
from precision_policy.tensorflow import Session, TF1LossScaleOptimizer  # noqa: E402

PLANT = {2: np.inf, 3: np.nan, 4: np.inf, 9: np.inf}


def data(step):
    rng = np.random.RandomState(step)
    x = rng.randn(32, 8).astype("float32")
    return x, x.sum(1, keepdims=True)


def test_gradient_tape_loop_skips_planted_overflows_and_follows_the_ascend_schedule():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    preset = dict(init_scale=2.0**10, growth_interval=3)
    opt = LossScaleOptimizer(keras.optimizers.Adam(0.01), loss_scale=DynamicLossScale.preset("ascend", **preset))
    reference = DynamicLossScale.preset("ascend", **preset)
    losses = []
    for step in range(120):
        x, y = data(step)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
            scaled = opt.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        if step in PLANT:
            g = grads[0].numpy()
            g[0, 0] = PLANT[step]
            grads[0] = tf.constant(g)
        before = [w.numpy().copy() for w in model.weights]
        opt.apply(grads, model.trainable_variables)
        if step in PLANT:
            assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))  # untouched
        reference.update(step in PLANT)
        assert float(opt.dynamic_scale.numpy()) == np.float32(reference.scale), step
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < losses[0] * 0.1
    state = opt.state_dict()
    assert state["skipped_steps"] == len(PLANT) and state["kind"] == "dynamic"
    fresh = LossScaleOptimizer(keras.optimizers.Adam(0.01), loss_scale="ascend")
    fresh.build(model.trainable_variables)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_model_fit_with_a_plan_and_a_loss_scale_optimizer():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    apply(model, pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False))
    opt = LossScaleOptimizer(keras.optimizers.Adam(0.01), loss_scale="keras")
    model.compile(opt, "mse")
    x = np.concatenate([data(s)[0] for s in range(20)])
    y = x.sum(1, keepdims=True)
    hist = model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0] * 0.2
    assert float(opt.dynamic_scale.numpy()) == 2.0**15


def test_tf1_session_training_with_planted_overflows():
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.placeholder(tf.float32, [None, 8])
        y = tf.compat.v1.placeholder(tf.float32, [None, 1])
        poison = tf.compat.v1.placeholder_with_default(tf.constant(0.0), [])
        w1 = tf.compat.v1.get_variable("w1", [8, 16])
        w2 = tf.compat.v1.get_variable("w2", [16, 1])
        loss = tf.reduce_mean(tf.square(tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2) - y))
        opt = TF1LossScaleOptimizer(tf.compat.v1.train.AdamOptimizer(0.01), loss_scale=DynamicLossScale.preset(
            "ascend", init_scale=2.0**10, growth_interval=3))
        pairs = opt.compute_gradients(loss)
        pairs = [(pairs[0][0] + poison, pairs[0][1])] + pairs[1:]  # fault injection into one gradient
        train = opt.apply_gradients(pairs)
        init = tf.compat.v1.global_variables_initializer()
    reference = DynamicLossScale.preset("ascend", init_scale=2.0**10, growth_interval=3)
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
    with Session(cfg, graph=g) as sess:
        sess.run(init)
        first = None
        for step in range(150):
            xs, ys = data(step)
            feed = {x: xs, y: ys}
            if step in PLANT:
                feed[poison] = PLANT[step]
            before = sess.run([w1, w2])
            value, _ = sess.run([loss, train], feed)
            first = first if first is not None else value
            if step in PLANT:
                assert all(np.array_equal(a, b) for a, b in zip(before, sess.run([w1, w2])))
            reference.update(step in PLANT)
            assert sess.run(opt.scale) == np.float32(reference.scale), step
        assert sess.run(opt.skipped_steps) == len(PLANT)
        assert value < first * 0.2
