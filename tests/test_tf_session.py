"""precision_policy.tensorflow.Session as a real TF session: savers, default sessions, eval/run, callables.

Every test trains a real TF1 graph (ref ``VariableV2`` and resource variables) under
allow_mix_precision_bf16 with the tf_amp_bf16 library.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow.python.client.session import SessionInterface  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.tensorflow import Session  # noqa: E402

CFG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
KINDS = pytest.mark.parametrize("resource", [False, True], ids=["ref", "resource"])
RNG = np.random.RandomState(0)
XS = RNG.randn(64, 8).astype("float32")
YS = (XS @ RNG.randn(8, 1)).astype("float32")


class Net:
    """A two-layer regression net with a GradientDescent step and a global step, in a graph of its own."""

    def __init__(self, resource: bool, saver: bool = False) -> None:
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.compat.v1.set_random_seed(0)
            self.x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
            self.y = tf.compat.v1.placeholder(tf.float32, [None, 1], name="y")
            self.w1 = tf.compat.v1.get_variable("w1", [8, 16], use_resource=resource)
            self.b1 = tf.compat.v1.get_variable("b1", [16], initializer=tf.compat.v1.zeros_initializer(),
                                                use_resource=resource)
            self.w2 = tf.compat.v1.get_variable("w2", [16, 1], use_resource=resource)
            self.hidden = tf.matmul(self.x, self.w1, name="hidden")
            pred = tf.matmul(tf.nn.relu(tf.nn.bias_add(self.hidden, self.b1)), self.w2)
            self.loss = tf.reduce_mean(tf.square(pred - self.y), name="loss")
            self.step = tf.compat.v1.train.get_or_create_global_step()
            self.train = tf.compat.v1.train.GradientDescentOptimizer(0.02).minimize(self.loss, global_step=self.step)
            self.init = tf.compat.v1.global_variables_initializer()
            self.saver = tf.compat.v1.train.Saver() if saver else None
        want = "VarHandleOp" if resource else "VariableV2"
        assert {op.type for op in self.graph.get_operations() if op.name == "w1"} == {want}
        self.feed = {self.x: XS, self.y: YS}

    @property
    def weights(self) -> list:
        return [self.w1, self.b1, self.w2, self.step]

    def fit(self, sess: Session, steps: int) -> float:
        for _ in range(steps):
            sess.run(self.train, self.feed)
        return float(sess.run(self.loss, self.feed))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_it_is_a_session_of_the_users_graph_and_runs_the_rewritten_one():
    net = Net(resource=True)
    sess = Session(CFG, graph=net.graph)
    assert isinstance(sess, SessionInterface)
    assert sess.graph is net.graph and sess.sess_str == "" and sess.rewritten is None
    assert [n.name for n in sess.graph_def.node] == [n.name for n in net.graph.as_graph_def().node]
    assert any(d.device_type == "CPU" for d in sess.list_devices())  # before the first run too
    sess.run(net.init)
    hidden = sess.run(net.hidden, net.feed)
    assert sess.rewritten.get_tensor_by_name("hidden:0").dtype == tf.bfloat16  # it ran in bfloat16 ...
    assert hidden.dtype == np.float32  # ... and came back in the user's dtype
    assert np.allclose(hidden, XS @ sess.run(net.w1), rtol=0.05, atol=0.05)
    user_nodes = {op.name for op in net.graph.get_operations()}
    assert user_nodes <= {op.name for op in sess.rewritten.get_operations()}
    assert [d.name for d in sess.list_devices()] == [d.name for d in tf.compat.v1.Session(graph=tf.Graph())
                                                     .list_devices()]
    sess.close()


@KINDS
def test_saver_round_trip_restores_the_saved_values_and_training_goes_on(tmp_path, resource):
    net = Net(resource, saver=True)
    with Session(CFG, graph=net.graph) as sess:
        sess.run(net.init)
        first = float(sess.run(net.loss, net.feed))
        at_save = net.fit(sess, 30)
        path = net.saver.save(sess, str(tmp_path / "model"), global_step=net.step)
        saved = sess.run(net.weights)
        assert saved[-1] == 30 and at_save < first
        net.fit(sess, 30)
        assert not same(sess.run(net.weights), saved)  # training moved on ...
        net.saver.restore(sess, path)
        assert same(sess.run(net.weights), saved)  # ... and the restore brings back exactly what was saved
        assert float(sess.run(net.loss, net.feed)) == pytest.approx(at_save, rel=1e-6)
        after = net.fit(sess, 60)
        assert after < at_save * 0.8 and sess.run(net.step) == 90
        assert sess.builds == 1  # the saver was in the graph before the first run: planned once
    reader = tf.train.load_checkpoint(path)  # an ordinary float32 checkpoint
    assert reader.get_variable_to_dtype_map()["w1"] == tf.float32
    assert np.array_equal(reader.get_tensor("w1"), saved[0]) and reader.get_tensor("global_step") == 30


@KINDS
def test_a_float32_checkpoint_from_a_plain_session_restores_into_the_mixed_precision_one(tmp_path, resource):
    plain_net = Net(resource, saver=True)
    with tf.compat.v1.Session(graph=plain_net.graph) as plain:
        plain.run(plain_net.init)
        plain_loss = plain_net.fit(plain, 20)
        path = plain_net.saver.save(plain, str(tmp_path / "fp32"))
        expected = plain.run(plain_net.weights)
    net = Net(resource, saver=True)
    with Session(CFG, graph=net.graph) as sess:
        net.saver.restore(sess, path)  # the first run is a restore: no initialiser needed
        assert same(sess.run(net.weights), expected)
        assert float(sess.run(net.loss, net.feed)) == pytest.approx(plain_loss, rel=0.05)
        assert net.fit(sess, 40) < plain_loss


@KINDS
def test_a_saver_built_after_the_first_run_replans_and_carries_the_variables_over(tmp_path, resource, caplog):
    net = Net(resource)
    with Session(CFG, graph=net.graph) as sess:
        sess.run(net.init)
        trained = net.fit(sess, 25)
        before = sess.run(net.weights)
        first_plan = sess.plan
        saver = tf.compat.v1.train.Saver()  # the user's graph is the default graph inside `with sess`
        with caplog.at_level(logging.INFO, logger="precision_policy"):
            path = saver.save(sess, str(tmp_path / "late"))
        assert sess.builds == 2 and sess.plan is not first_plan
        assert "carried 4 variable value(s)" in caplog.text
        assert same(sess.run(net.weights), before)  # nothing re-initialised, nothing lost
        assert np.array_equal(tf.train.load_checkpoint(path).get_tensor("w2"), before[2])
        assert net.fit(sess, 25) < trained
        saver.restore(sess, path)
        assert same(sess.run(net.weights), before)
        assert sess.builds == 2  # save and restore added no ops


def test_a_variable_built_after_the_first_run_needs_its_initialiser_as_in_tf():
    net = Net(resource=False)
    with Session(CFG, graph=net.graph) as sess:
        sess.run(net.init)
        net.fit(sess, 5)
        before = sess.run(net.weights)
        extra = tf.compat.v1.get_variable("extra", [3], initializer=tf.compat.v1.ones_initializer())
        with pytest.raises(tf.errors.FailedPreconditionError):
            sess.run(extra)
        sess.run(extra.initializer)
        assert np.array_equal(sess.run(extra), np.ones(3, "float32"))
        assert same(sess.run(net.weights), before)


def test_rebuild_false_keeps_the_clear_error():
    net = Net(resource=True)
    with Session(CFG, graph=net.graph, rebuild=False) as sess:
        sess.run(net.init)
        tf.compat.v1.train.Saver()
        with pytest.raises(pp.GraphError, match="changed after the session first ran"):
            sess.run(net.loss, net.feed)


@KINDS
def test_as_default_eval_and_op_run(resource):
    net = Net(resource)
    sess = Session(CFG, graph=net.graph)
    assert tf.compat.v1.get_default_session() is None
    with sess.as_default():
        assert tf.compat.v1.get_default_session() is sess
        net.init.run()
        first = net.loss.eval(net.feed)
        for _ in range(40):
            net.train.run(net.feed)
        assert net.loss.eval(net.feed) < first * 0.8 and sess.run(net.step) == 40
        assert isinstance(first, np.float32)
        with net.graph.as_default():  # a variable's eval() wants its graph too, as with tf.compat.v1.Session
            assert net.step.eval() == 40
    assert tf.compat.v1.get_default_session() is None
    with pytest.raises(ValueError, match="No default session"):
        net.loss.eval(net.feed)
    assert net.loss.eval(net.feed, session=sess) < first * 0.8
    sess.close()


def test_the_context_manager_sets_the_default_graph_and_session_and_closes():
    net = Net(resource=True)
    with Session(CFG, graph=net.graph) as sess:
        assert tf.compat.v1.get_default_graph() is net.graph
        assert tf.compat.v1.get_default_session() is sess
        net.init.run()
        with pytest.raises(RuntimeError, match="not re-entrant"):
            with sess:
                pass
    assert tf.compat.v1.get_default_session() is None
    with pytest.raises(RuntimeError, match="closed Session"):
        sess.run(net.loss, net.feed)
    sess.close()  # closing again is harmless


def test_close_is_idempotent_and_a_closed_session_refuses_to_run():
    net = Net(resource=False)
    sess = Session(CFG, graph=net.graph)
    sess.run(net.init)
    sess.close()
    sess.close()
    with pytest.raises(RuntimeError, match="closed Session"):
        sess.run(net.init)
    never_ran = Session(CFG, graph=net.graph)
    never_ran.close()
    never_ran.close()
    with pytest.raises(RuntimeError, match="closed Session"):
        never_ran.run(net.init)


def test_make_callable():
    net = Net(resource=True)
    with Session(CFG, graph=net.graph) as sess:
        sess.run(net.init)
        step = sess.make_callable(net.train, [net.x, net.y])
        loss = sess.make_callable([net.loss, net.step], feed_list=(net.x, net.y))
        first, _ = loss(XS, YS)
        assert step(XS, YS) is None
        value, count = loss(XS, YS)
        assert count == 1 and value < first
        assert np.array_equal(sess.run(net.loss, net.feed), value)
        with pytest.raises(TypeError, match="2 feed value"):
            loss(XS)
        traced = sess.make_callable(net.w1, accept_options=True)
        meta = tf.compat.v1.RunMetadata()
        out = traced(options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                     run_metadata=meta)
        assert out.shape == (8, 16) and len(meta.step_stats.dev_stats) > 0
        with pytest.raises(TypeError, match="unexpected keyword"):
            sess.make_callable(net.w1)(options=None)
        with pytest.raises(TypeError, match="cannot fetch"):
            sess.make_callable(3)


def test_fetch_structures_sparse_tensors_and_dropped_casts():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [4, 8], name="x")
        h = tf.matmul(x, tf.constant(np.ones((8, 8), "float32")), name="h")
        h16 = tf.cast(h, tf.bfloat16, name="h16")  # an identity once h runs in bfloat16: the rewrite drops it
        out = tf.nn.relu(tf.cast(h16, tf.float32), name="out")
        lonely = tf.constant(3.0, name="lonely")  # read by nothing
        sp = tf.compat.v1.sparse_placeholder(tf.float32, name="sp")
        doubled = tf.SparseTensor(sp.indices, sp.values * 2.0, sp.dense_shape)
    pair = collections.namedtuple("pair", "low out")
    xs = np.ones((4, 8), "float32")
    with Session(CFG, graph=g) as sess:
        got = sess.run({"h": h, "pair": pair(h16, out), "by_name": "out:0", "op": out.op, "c": lonely}, {x: xs})
        assert sess.rewritten.get_tensor_by_name("h:0").dtype == tf.bfloat16
        assert got["h"].dtype == np.float32 and np.array_equal(got["h"], np.full((4, 8), 8.0, "float32"))
        assert isinstance(got["pair"], pair) and got["pair"].low.dtype == tf.bfloat16.as_numpy_dtype
        assert np.array_equal(got["pair"].out, got["by_name"]) and got["op"] is None and got["c"] == 3.0
        value = tf.compat.v1.SparseTensorValue([[0, 1], [2, 3]], [1.5, 2.5], [3, 4])
        result = sess.run(doubled, {sp: value})
        assert isinstance(result, tf.compat.v1.SparseTensorValue)
        assert result.values.tolist() == [3.0, 5.0] and result.dense_shape.tolist() == [3, 4]
        assert sess.run(doubled, {sp: ([[0, 0]], [7.0], [2, 2])}).values.tolist() == [14.0]


def test_partial_run_and_elements_of_another_graph():
    net = Net(resource=True)
    other = Net(resource=True)
    with Session(CFG, graph=net.graph) as sess:
        sess.run(net.init)
        handle = sess.partial_run_setup([net.hidden, net.loss], [net.x, net.y])
        hidden = sess.partial_run(handle, net.hidden, {net.x: XS})
        loss = sess.partial_run(handle, net.loss, {net.y: YS})
        assert hidden.dtype == np.float32 and hidden.shape == (64, 16)
        assert loss == pytest.approx(float(sess.run(net.loss, net.feed)), rel=1e-6)
        with pytest.raises(ValueError, match="not an element of this session's graph"):
            sess.run(other.loss, net.feed)  # same names, other graph: refused, not silently swapped
        with pytest.raises(ValueError, match="not an element of this session's graph"):
            sess.run(net.loss, {other.x: XS, net.y: YS})
