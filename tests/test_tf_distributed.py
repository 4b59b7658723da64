"""Loss scaling under tf.distribute.MirroredStrategy with 2 replicas, overflows planted on ONE replica.

The two logical CPU devices must be configured before TensorFlow initialises its devices,
so each scenario runs this file as a script in a fresh interpreter (``python
test_tf_distributed.py keras|tf1``), which prints one JSON line: per training step, each
replica's weights compared with the other's and with the step before, each replica's loss
scale and skip count, and the loss. The tests check that line.

Overflows are planted in the gradients of one replica only (replica 1 at step 5, replica 0
at step 12): the step must be skipped on both (weights unchanged and identical), the loss
scale must back off once per planted step and otherwise stay put, and training must converge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each scenario starts TensorFlow in a fresh interpreter (5-10 s)

PLANTS = {5: 1, 12: 0}  # step -> the one replica whose gradients overflow
STEPS = 60
INIT_SCALE = 2.0**10
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- the scripts (run in a fresh interpreter)
def _devices() -> None:
    """Two logical CPU devices; must run before TensorFlow initialises its devices."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def _record(before: list, after: list, scale: list, skipped: list, loss: float) -> dict:
    """One step: ``before``/``after`` hold each weight's per-replica values."""
    return {
        "replicas_equal": all(np.array_equal(w[0], w[1]) for w in after),
        "changed": [not np.array_equal(b[r], a[r]) for r in range(2) for b, a in zip(before, after)],
        "finite": all(bool(np.isfinite(np.asarray(v)).all()) for w in after for v in w),
        "scale": [float(s) for s in scale],
        "skipped": [int(s) for s in skipped],
        "loss": float(loss),
    }


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.randn(STEPS * 16, 8).astype("float32")
    return x, x @ rng.randn(8, 1).astype("float32")


def keras_script() -> dict:
    """``model.fit`` with precision_policy.keras.LossScaleOptimizer and a bf16 plan, under MirroredStrategy."""
    _devices()
    import keras
    import tensorflow as tf

    import precision_policy as pp
    from precision_policy.keras import LossScaleOptimizer, apply, plan_of

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    plant_steps = tf.constant(sorted(PLANTS), tf.float32)
    plant_replicas = tf.constant([PLANTS[s] for s in sorted(PLANTS)], tf.int32)

    class Planted(keras.Model):
        """The step number rides in ``y``'s second column (data order is fixed: shuffle=False)."""

        def train_step(self, data):
            x, y = data
            step, y = y[0, 1], y[:, :1]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(tf.cast(self(x, training=True), tf.float32) - y))
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, self.trainable_weights)
            replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
            here = tf.reduce_any(tf.logical_and(tf.equal(plant_steps, step), tf.equal(plant_replicas, replica)))
            grads[0] = tf.where(here, tf.fill(tf.shape(grads[0]), np.inf), grads[0])
            self.optimizer.apply(grads, self.trainable_weights)
            return {"loss": loss}

    keras.utils.set_random_seed(0)
    x, y = _data()
    y = np.concatenate([y, (np.arange(len(y)) // 16)[:, None].astype("float32")], 1)
    with strategy.scope():
        inputs = keras.Input((8,))
        model = Planted(inputs, keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(inputs)))
        apply(model, pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16",
                                         use_env_lists=False))
        opt = LossScaleOptimizer(keras.optimizers.SGD(0.05), loss_scale={"preset": "keras", "init_scale": INIT_SCALE})
        model.compile(opt, jit_compile=False)

    def local(v):
        return [np.array(t) for t in strategy.experimental_local_results(v.value)]

    steps, state = [], {"w": [local(v) for v in model.trainable_weights]}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            after = [local(v) for v in model.trainable_weights]
            steps.append(_record(state["w"], after, local(opt.dynamic_scale), local(opt.skipped_steps),
                                 logs["loss"]))
            state["w"] = after

    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    low = sorted({layer.dtype_policy.compute_dtype for layer in model.layers if layer.weights})
    return {"steps": steps, "compute_dtypes": low, "converted": len(plan_of(model).converted())}


def tf1_script() -> dict:
    """TF1 graph, ``TF1LossScaleOptimizer(..., is_distributed=True)`` in ``call_for_each_replica``,
    run by precision_policy.tensorflow.Session."""
    _devices()
    import tensorflow as tf

    import precision_policy as pp
    from precision_policy.tensorflow import Session, TF1LossScaleOptimizer

    g = tf.Graph()
    with g.as_default():
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            tf.compat.v1.set_random_seed(0)
            x = tf.compat.v1.placeholder(tf.float32, [2, 8, 8], name="x")  # [replica, batch, features]
            y = tf.compat.v1.placeholder(tf.float32, [2, 8, 1], name="y")
            poison = tf.compat.v1.placeholder_with_default(tf.zeros([2]), [2], name="poison")
            w1 = tf.compat.v1.get_variable("w1", [8, 16])
            w2 = tf.compat.v1.get_variable("w2", [16, 1])
            opt = TF1LossScaleOptimizer(tf.compat.v1.train.AdamOptimizer(0.01), is_distributed=True,
                                        loss_scale={"preset": "keras", "init_scale": INIT_SCALE})

            def step_fn():
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                h = tf.nn.relu(tf.matmul(x[replica], w1))
                loss = tf.reduce_mean(tf.square(tf.matmul(h, w2) - y[replica]))
                pairs = opt.compute_gradients(loss)
                pairs = [(pairs[0][0] + poison[replica], pairs[0][1])] + pairs[1:]  # inf on one replica only
                return opt.apply_gradients(pairs), loss

            train, loss = strategy.extended.call_for_each_replica(step_fn)
            train = strategy.group(train)
            loss = strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None)
            init = tf.compat.v1.global_variables_initializer()
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
    xs, ys = _data()
    steps = []
    with Session(cfg, graph=g, config=tf.compat.v1.ConfigProto(device_count={"CPU": 2})) as sess:
        def local(v):
            return sess.run(list(strategy.experimental_local_results(v)))

        sess.run(init)
        for step in range(STEPS):
            batch = slice(step * 16, step * 16 + 16)
            feed = {x: xs[batch].reshape(2, 8, 8), y: ys[batch].reshape(2, 8, 1)}
            if step in PLANTS:
                feed[poison] = np.where(np.arange(2) == PLANTS[step], np.inf, 0.0).astype("float32")
            before = [local(w1), local(w2)]
            value, _ = sess.run([loss, train], feed)
            steps.append(_record(before, [local(w1), local(w2)], local(opt.scale), local(opt.skipped_steps), value))
        devices = sorted({op.device for op in sess.rewritten.get_operations() if op.type == "VarHandleOp"})
        converted = sorted({d.op_type for d in sess.plan.converted()})
    return {"steps": steps, "devices": devices, "converted": converted}


# ---------------------------------------------------------------------- the tests
def _run(scenario: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, __file__, scenario], capture_output=True, text=True, env=env,
                          timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, f"{scenario} script failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_steps(steps: list[dict]) -> None:
    assert len(steps) == STEPS
    scale, skipped = INIT_SCALE, 0
    for k, s in enumerate(steps):
        assert s["finite"] and s["replicas_equal"], (k, s)  # the replicas never diverge ...
        assert s["scale"][0] == s["scale"][1] and s["skipped"][0] == s["skipped"][1], (k, s)
        if k in PLANTS:  # ... both skip the step one of them overflowed on ...
            assert not any(s["changed"]), (k, s)
            scale, skipped = scale / 2, skipped + 1  # ... and the scale backs off once
        else:
            assert all(s["changed"]), (k, s)
        assert s["scale"][0] == scale and s["skipped"][0] == skipped, (k, s)
    losses = [s["loss"] for s in steps]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) * 0.1, losses


def test_keras_fit_under_mirrored_strategy_skips_an_overflow_on_one_replica_everywhere():
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    out = _run("keras")
    _check_steps(out["steps"])
    assert out["compute_dtypes"] == ["bfloat16"] and out["converted"] > 0  # the plan was in force


def test_tf1_session_under_mirrored_strategy_skips_an_overflow_on_one_replica_everywhere():
    pytest.importorskip("tensorflow")
    out = _run("tf1")
    _check_steps(out["steps"])
    assert any(d.endswith("CPU:1") for d in out["devices"]) and any(d.endswith("CPU:0") for d in out["devices"])
    assert "MatMul" in out["converted"]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = {"keras": keras_script, "tf1": tf1_script}[sys.argv[1]]()
    print(json.dumps(result))
