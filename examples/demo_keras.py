"""`make demo`, part 4: a Keras CNN trained with `model.fit` on scikit-learn's digits under precision modes.

The same model from the same seed in float32 and under allow_mix_precision_bf16 (TF's oneDNN
bf16 lists), allow_mix_precision, force_fp16 and allow_fp32_to_fp16 (TF's CUDA fp16 lists;
float16 emulated on the CPU): `precision_policy.keras.apply` gives each layer the DTypePolicy of
its plan, and the float16 runs train with `precision_policy.keras.LossScaleOptimizer`. Writes to
demo_out/keras/: the loss curves, the float16 runs' loss scale with the skipped steps, the accuracy
per mode (PNG) and each mode's plan report (HTML).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import precision_policy as pp  # noqa: E402
import precision_policy.keras  # noqa: E402

from demo_plots import epochs, out_dir, plot_accuracy, plot_loss_scale, plot_losses, report, show_files, slug  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
KERAS_EPOCHS, BATCH = epochs(10), 64
# float16 runs: dynamic loss scaling that starts high (2**24), so the first steps overflow, are skipped and halve
# the scale until the gradients fit float16; it grows again after every 100 good steps
FP16_SCALE = {"preset": "keras", "init_scale": 2.0**24, "growth_interval": 100}
KERAS_MODES = {
    "float32": None,
    "allow_mix_precision_bf16 / tf_amp_bf16": BF16,
    "allow_mix_precision (fp16, emulated) / tf_amp_fp16": pp.RunConfig(precision_mode="allow_mix_precision", op_info="tf_amp_fp16"),
    "force_fp16 (emulated) / tf_amp_fp16": pp.RunConfig(precision_mode="force_fp16", op_info="tf_amp_fp16"),
    "allow_fp32_to_fp16 (emulated) / tf_amp_fp16": pp.RunConfig(precision_mode="allow_fp32_to_fp16", op_info="tf_amp_fp16"),
}


def keras_cnn() -> keras.Model:
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    y = keras.layers.Conv2D(32, 3, padding="same", name="conv2")(x)
    y = keras.layers.ReLU(name="relu2")(y)
    x = keras.layers.Add(name="residual")([x, y])
    x = keras.layers.MaxPooling2D(name="maxpool")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="digits_cnn")


class Record(keras.callbacks.Callback):
    """Per step: a progress bar, the loss scale the step ran with and whether it was skipped; per epoch: the loss."""

    def __init__(self, name: str, total: int, opt: keras.optimizers.Optimizer) -> None:
        super().__init__()
        self.opt = opt if isinstance(opt, precision_policy.keras.LossScaleOptimizer) else None
        self.losses: list[float] = []
        self.scales: list[float] = []
        self.skipped: list[bool] = []
        self._scale = self.opt.policy_state.scale if self.opt is not None else 1.0
        self._skipped = 0
        self.bar = tqdm(total=total, desc=f"  {name[:28]:<28}", unit="step", leave=False)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.opt is not None:
            skipped = int(self.opt.skipped_steps.numpy())
            self.scales.append(self._scale)
            self.skipped.append(skipped > self._skipped)
            self._scale, self._skipped = float(self.opt.dynamic_scale.numpy()), skipped
        self.bar.update(1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.losses.append(float((logs or {})["loss"]))
        self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}")

    def on_train_end(self, logs: dict | None = None) -> None:
        self.bar.close()


def train_keras(name: str, config: pp.RunConfig | None, data: tuple[np.ndarray, ...]) -> tuple[Record, float, keras.Model]:
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(0)
    model = keras_cnn()
    if config is not None:
        precision_policy.keras.apply(model, config)  # each layer gets the DTypePolicy of its plan
    steps = KERAS_EPOCHS * int(np.ceil(len(y_train) / BATCH))
    opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps))
    if config is not None and config.mode.low == "float16":
        opt = precision_policy.keras.LossScaleOptimizer(opt, loss_scale=FP16_SCALE)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    record = Record(name, steps, opt)
    model.fit(x_train, y_train, batch_size=BATCH, epochs=KERAS_EPOCHS, verbose=0, shuffle=True, callbacks=[record])
    return record, model.evaluate(x_test, y_test, verbose=0)[1] * 100, model


def keras_digits(out: Path) -> list[Path]:
    print(f"\n=== Keras: a CNN on scikit-learn digits with model.fit ({KERAS_EPOCHS} epochs) " + "=" * 28)
    d = load_digits()
    x = (d.images[..., None] / 16.0).astype("float32")
    perm = np.random.RandomState(0).permutation(len(d.target))
    n = int(0.8 * len(perm))
    data = (x[perm[:n]], d.target[perm[:n]], x[perm[n:]], d.target[perm[n:]])
    records: dict[str, Record] = {}
    accuracy: dict[str, float] = {}
    files: list[Path] = []
    for name, cfg in KERAS_MODES.items():
        records[name], accuracy[name], model = train_keras(name, cfg, data)
        rec = records[name]
        skipped = f"   {sum(rec.skipped)} step(s) skipped by the loss scaler" if rec.scales else ""
        print(f"  {name:<52} test accuracy {accuracy[name]:6.2f}%{skipped}")
        if cfg is not None:
            plan = precision_policy.keras.plan_of(model)
            if plan is not None:
                print(f"      plan: {plan.summary()}")
                files.append(report(plan, out / f"report_{slug(cfg.mode.name)}.html", title=f"Keras digits CNN: {name}"))
    print("  (force_fp16 and allow_mix_precision make the same plan here: the model has no deny-list op, so their curves coincide)")
    files[:0] = [
        plot_losses({n: r.losses for n, r in records.items()}, out / "loss.png",
                    "Keras CNN on digits (model.fit): training loss per precision mode", xlabel="epoch"),
        plot_loss_scale({n: (r.scales, r.skipped) for n, r in records.items()}, out / "loss_scale.png",
                        "Keras float16 runs: LossScaleOptimizer's scale per step (starting at 2**24)"),
        plot_accuracy(accuracy, out / "accuracy.png", f"Keras CNN on digits: test accuracy after {KERAS_EPOCHS} epochs"),
    ]
    return files


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    # tiny kernels: one thread each is faster than two on a busy 2-core machine (set before TF starts its pools)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    show_files(keras_digits(out_dir("keras")))


if __name__ == "__main__":
    main()
