"""Loss scaling for Keras 3 (``model.fit`` and GradientTape loops) and TF1 session training.

Both wrappers run the core's dynamic loss-scale rule (:func:`precision_policy.loss_scale.transition`)
on TensorFlow variables, so every preset (torch, keras, ascend, mindspore) behaves the same
here as in PyTorch.

Example:
    >>> import keras, precision_policy as pp
    >>> from precision_policy.keras import LossScaleOptimizer
    >>> opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), loss_scale="ascend")
    >>> float(opt.scale_loss(1.0))
    4294967296.0
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from precision_policy.loss_scale import DynamicLossScale, FixedLossScale, from_config, transition

log = logging.getLogger(__name__)


class _KerasOps:
    where = staticmethod(keras.ops.where)
    logical_and = staticmethod(keras.ops.logical_and)
    logical_or = staticmethod(keras.ops.logical_or)
    logical_not = staticmethod(keras.ops.logical_not)


def _state(loss_scale: Any) -> DynamicLossScale | FixedLossScale:
    state = loss_scale if isinstance(loss_scale, (DynamicLossScale, FixedLossScale)) else from_config(loss_scale)
    if state is None:
        raise ValueError("LossScaleOptimizer needs a loss scale ('dynamic', a number, a preset name, ...)")
    return state


def _all_replicas(flag: Any) -> Any:
    """``flag`` (a boolean tensor) and-ed over the replicas in sync; as is outside a multi-replica step."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return flag
    low = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flag), tf.float32))
    return tf.equal(low, 0.0)


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' LossScaleOptimizer running precision_policy's loss-scale state machine.

    Works in ``model.fit`` (Keras calls ``scale_loss``) and in custom loops
    (``opt.scale_loss(loss)`` before the tape's gradient, ``opt.apply(grads, vars)`` after).
    A step with non-finite gradients leaves the weights untouched; under a ``tf.distribute``
    strategy the overflow flag is all-reduced, so an overflow on one replica skips the step on
    all of them. ``state_dict()`` / ``load_state_dict()`` use the core's format.
    """

    def __init__(self, inner_optimizer: keras.optimizers.Optimizer, loss_scale: Any = "keras",
                 name: str | None = None, **kwargs: Any) -> None:
        state = _state(loss_scale)
        super().__init__(inner_optimizer, initial_scale=state.scale, name=name, **kwargs)
        self.policy_state = state

    def build(self, var_list: Any) -> None:
        self.bad_steps = self.add_variable(shape=(), dtype="int", initializer="zeros", aggregation="none",
                                           name="bad_steps")
        self.skipped_steps = self.add_variable(shape=(), dtype="int", initializer="zeros", aggregation="none",
                                               name="skipped_steps")
        super().build(var_list)

    def check_finite(self, grads: Any) -> Any:
        """Whether every gradient is finite on every replica.

        Keras checks this replica's gradients only (before they are all-reduced) and, under a
        strategy using merge calls (``MirroredStrategy``), then takes the first replica's answer:
        an overflow on another replica went into the all-reduced update. The flag is all-reduced
        here, so all replicas skip the same steps.
        """
        finite = super().check_finite(grads)
        return _all_replicas(finite)

    def _advance(self, found_inf: bool) -> None:
        p = self.policy_state
        if isinstance(p, FixedLossScale):
            return
        scale, good, bad = transition(_KerasOps, p, self.dynamic_scale.value, self.step_counter.value,
                                      self.bad_steps.value, found_inf)
        self.dynamic_scale.assign(scale)
        self.step_counter.assign(good)
        self.bad_steps.assign(bad)

    def _stateful_handle_finite_grads(self, grads: Any, trainable_variables: Any = None) -> None:
        scale = self.dynamic_scale
        tvs = trainable_variables or self._trainable_variables
        unscaled = [g if g is None or self._overwrite_variable_with_gradient(v) else keras.ops.divide(g, scale)
                    for g, v in zip(grads, tvs)]
        self.inner_optimizer.apply(unscaled, trainable_variables=trainable_variables)
        self._advance(False)

    def _stateful_handle_non_finite_grads(self) -> None:
        self.skipped_steps.assign_add(1)
        self._advance(True)

    def state_dict(self) -> dict[str, Any]:
        state = self.policy_state.state_dict()
        if self.built:
            state["scale"] = float(self.dynamic_scale.numpy())
            state["skipped_steps"] = int(self.skipped_steps.numpy())
            if state["kind"] == "dynamic":
                state["good_steps"] = int(self.step_counter.numpy())
                state["bad_steps"] = int(self.bad_steps.numpy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy_state.load_state_dict(state)
        if self.built:
            self.dynamic_scale.assign(state["scale"])
            self.skipped_steps.assign(state["skipped_steps"])
            if state["kind"] == "dynamic":
                self.step_counter.assign(state["good_steps"])
                self.bad_steps.assign(state["bad_steps"])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["loss_scale"] = self.policy_state.state_dict()
        return config


class _TFOps:
    where = staticmethod(tf.where)
    logical_and = staticmethod(tf.logical_and)
    logical_or = staticmethod(tf.logical_or)
    logical_not = staticmethod(tf.logical_not)


class TF1LossScaleOptimizer(tf.compat.v1.train.Optimizer):
    """A ``tf.compat.v1.train.Optimizer`` wrapper for session training (the NPU flow of the seeds).

    ``minimize``/``compute_gradients`` scale the loss and unscale the gradients;
    ``apply_gradients`` applies them only when all are finite and advances the loss-scale state.
    Inside a ``tf.distribute`` strategy with several replicas in sync (``strategy.run`` or
    ``strategy.extended.call_for_each_replica``) the overflow flag is all-reduced and the
    skip-or-apply decision is taken once, in cross-replica context, so every replica skips the
    same steps and the loss-scale variables stay identical. ``is_distributed`` (the NPU
    optimizer's flag) is accepted for compatibility: with several replicas the flag is always
    all-reduced, since the inner optimizer's all-reduced update would carry any replica's overflow.
    """

    def __init__(self, optimizer: tf.compat.v1.train.Optimizer, loss_scale: Any = "ascend",
                 is_distributed: bool = False, name: str = "LossScaleOptimizer") -> None:
        super().__init__(use_locking=False, name=name)
        self._opt = optimizer
        self.policy_state = _state(loss_scale)
        self.is_distributed = is_distributed
        with tf.compat.v1.variable_scope(name):
            init = self.policy_state.scale
            self.scale = tf.compat.v1.get_variable("loss_scale", initializer=tf.constant(init, tf.float32),
                                                   trainable=False)
            self.good_steps = tf.compat.v1.get_variable("good_steps", initializer=tf.constant(0, tf.int64),
                                                        trainable=False)
            self.bad_steps = tf.compat.v1.get_variable("bad_steps", initializer=tf.constant(0, tf.int64),
                                                       trainable=False)
            self.skipped_steps = tf.compat.v1.get_variable("skipped_steps", initializer=tf.constant(0, tf.int64),
                                                           trainable=False)

    def compute_gradients(self, loss: Any, var_list: Any = None, **kwargs: Any) -> list:
        scaled = tf.cast(loss, tf.float32) * self.scale
        pairs = self._opt.compute_gradients(scaled, var_list=var_list, **kwargs)
        inv = 1.0 / self.scale
        return [(None if g is None else g * tf.cast(inv, g.dtype), v) for g, v in pairs]

    def apply_gradients(self, grads_and_vars: Any, global_step: Any = None, name: str | None = None) -> Any:
        grads_and_vars = list(grads_and_vars)
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g, _ in grads_and_vars if g is not None]
        ok = tf.reduce_all(tf.stack(finite)) if finite else tf.constant(True)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            # The inner optimizer all-reduces the gradients: one replica's overflow reaches every
            # replica's update, so all of them must skip. The decision is taken once, across replicas.
            if not self.is_distributed:
                log.debug("%s: %d replicas in sync: the overflow flag is all-reduced", self._name,
                          ctx.num_replicas_in_sync)
            found = tf.logical_not(_all_replicas(ok))
            return ctx.merge_call(self._cross_replica_apply, args=(found, grads_and_vars, global_step, name))
        found = tf.logical_not(ok)
        apply = tf.cond(found, lambda: tf.no_op(),
                        lambda: tf.group(self._opt.apply_gradients(grads_and_vars, global_step=global_step)))
        with tf.control_dependencies([apply]):
            update = self._update_state(found)
        return tf.group(apply, update, name=name or "apply_loss_scaled_gradients")

    def _cross_replica_apply(self, strategy: Any, found: Any, grads_and_vars: list, global_step: Any,
                             name: str | None) -> Any:
        """The skip-or-apply decision in cross-replica context (a branch may not merge-call otherwise)."""
        found = tf.reduce_any(tf.stack(strategy.experimental_local_results(found)))

        def apply() -> Any:
            per_replica = strategy.extended.call_for_each_replica(
                lambda pairs: self._opt.apply_gradients(pairs, global_step=global_step), args=(grads_and_vars,))
            return tf.group(strategy.experimental_local_results(per_replica))

        applied = tf.cond(found, lambda: tf.no_op(), apply)
        with tf.control_dependencies([applied]):
            update = self._update_state(found)
        return tf.group(applied, update, name=name or "apply_loss_scaled_gradients")

    def _update_state(self, found: Any) -> Any:
        if isinstance(self.policy_state, FixedLossScale):
            return tf.group(self.skipped_steps.assign_add(tf.cast(found, tf.int64)))
        scale, good, bad = transition(_TFOps, self.policy_state, self.scale, self.good_steps, self.bad_steps, found)
        return tf.group(self.scale.assign(scale), self.good_steps.assign(good), self.bad_steps.assign(bad),
                        self.skipped_steps.assign_add(tf.cast(found, tf.int64)))

    def get_slot(self, *args: Any, **kwargs: Any) -> Any:
        return self._opt.get_slot(*args, **kwargs)

    def get_slot_names(self, *args: Any, **kwargs: Any) -> Any:
        return self._opt.get_slot_names(*args, **kwargs)

    def variables(self) -> list:
        return self._opt.variables() + [self.scale, self.good_steps, self.bad_steps, self.skipped_steps]

    def _apply_dense(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - apply_gradients is overridden
        raise NotImplementedError

    def _resource_apply_dense(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError
