"""Loss scaling in PyTorch training loops: fault injection, checkpoints, DDP, and float16 underflow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import precision_policy as pp  # noqa: E402
from precision_policy.loss_scale import DynamicLossScale  # noqa: E402
from precision_policy.torch import LossScaler, prepare  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(1, keepdim=True)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_planted_overflows_skip_steps_keep_weights_bit_identical_and_follow_the_schedule(caplog):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = LossScaler(DynamicLossScale.preset("torch", growth_interval=3), model=model)
    reference = DynamicLossScale.preset("torch", growth_interval=3)
    plant = {2: float("inf"), 3: float("nan"), 7: float("inf")}
    losses = []
    for step in range(150):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step in plant:
            model[2].weight.grad[0, 3] = plant[step]
        before = snapshot(model)
        with caplog.at_level("WARNING"):
            applied = scaler.step(opt)
        assert applied == (step not in plant)
        if not applied:
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))  # bit-identical across a skip
            assert scaler.last_overflow == ["2.weight"]
            assert "2.weight" in caplog.text and "skipped" in caplog.text
        scaler.update()
        reference.update(step in plant)
        assert scaler.get_scale() == reference.scale
    assert sum(losses[-10:]) / 10 < losses[0] * 0.1  # and training converges


def test_gradient_accumulation_with_a_power_of_two_scale_is_exact():
    plain, scaled = mlp(), mlp()
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(scaled.parameters(), lr=0.05)
    scaler = LossScaler(1024.0)
    for step in range(0, 12, 3):
        for micro in range(3):  # accumulate three micro-batches per optimizer step
            x, y = batch(step + micro)
            torch.nn.functional.mse_loss(plain(x), y).backward()
            scaler.scale(torch.nn.functional.mse_loss(scaled(x), y)).backward()
        opt_a.step()
        opt_a.zero_grad()
        assert scaler.step(opt_b)
        scaler.update()
        opt_b.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), scaled.parameters()))


def test_unscale_before_clipping_and_several_optimizers():
    x, y = batch(0)
    # the reference: float32 gradients, no scaling, clipped to a quarter of their norm (so the clip bites)
    ref = mlp()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    true_norm = torch.nn.utils.clip_grad_norm_(ref[0].parameters(), float("inf")).item()
    max_norm = true_norm / 4
    torch.nn.utils.clip_grad_norm_(ref[0].parameters(), max_norm)
    want = [p.detach() - 0.1 * p.grad for p in ref[0].parameters()]  # what SGD(lr=0.1) must do

    model = mlp()
    opt1 = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt2 = torch.optim.Adam(model[2].parameters(), lr=0.01)
    scaler = LossScaler("dynamic", model=model)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    assert scaler.get_scale() == 2.0**16 and model[0].weight.grad.norm().item() > 1000 * max_norm  # scaled now
    scaler.unscale_(opt1)
    torch.nn.utils.clip_grad_norm_(model[0].parameters(), max_norm)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(opt1)
    assert scaler.step(opt1) and scaler.step(opt2)
    # the clip saw unscaled gradients, and step did not unscale them again: the update is the
    # reference's (clipping scaled gradients, or unscaling twice, is off by a factor of ~2**16)
    for got, exp in zip(model[0].parameters(), want):
        torch.testing.assert_close(got.detach(), exp, rtol=1e-5, atol=1e-6)
    scaler.update()
    # an overflow in one optimizer's parameters skips that optimizer only (GradScaler's rule)
    opt1.zero_grad(), opt2.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    model[2].bias.grad[0] = float("inf")
    assert scaler.step(opt1) and not scaler.step(opt2)
    scaler.update()
    assert scaler.get_scale() == 2.0**15


def test_emulated_fp16_gradients_overflow_and_skip():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = pp.RunConfig(precision_mode="force_fp16", op_info="ascend910", use_env_lists=False, loss_scale="dynamic")
    model, scaler = prepare(model, opt, cfg)
    x, y = batch(0)
    loss = torch.nn.functional.mse_loss(model(x * 1e4), y)  # float16 activations overflow at this scale
    scaler.scale(loss).backward()
    assert not scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**15


RESUME = textwrap.dedent(
    """
    import sys, json, torch
    sys.path.insert(0, {tests!r})
    from test_torch_loss_scale import mlp, batch
    from precision_policy.torch import LossScaler
    from precision_policy.loss_scale import DynamicLossScale
    mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = LossScaler(DynamicLossScale.preset("ascend", init_scale=2.0**10, growth_interval=2), model=model)
    start = 0
    if mode == "resume":
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"]); scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
    for step in range(start, 12):
        if mode == "first" and step == 6:
            torch.save({{"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                        "step": step}}, path)
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step in (2, 4, 7, 9):
            model[0].weight.grad[1, 1] = float("inf")
        scaler.step(opt)
        scaler.update()
    json.dump({{"weights": [p.detach().flatten().tolist() for p in model.parameters()],
               "scaler": scaler.state_dict()}}, open(out, "w"))
    """
)


def test_scaler_saved_mid_run_continues_bit_identically_in_a_fresh_process(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME.format(tests=str(REPO / "tests")))
    ckpt, full, resumed = tmp_path / "ckpt.pt", tmp_path / "full.json", tmp_path / "resumed.json"
    for mode, out in (("first", full), ("resume", resumed)):
        r = subprocess.run([sys.executable, str(script), mode, str(ckpt), str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    a, b = json.loads(full.read_text()), json.loads(resumed.read_text())
    assert a == b  # weights (as exact floats) and the scaler's whole state
    assert a["scaler"]["loss_scale"]["skipped_steps"] == 4


DDP = textwrap.dedent(
    """
    import os, sys, json, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_torch_loss_scale import mlp, batch
    from precision_policy.torch import LossScaler
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = LossScaler("dynamic", model=model)
    applied = []
    for step in range(6):
        x, y = batch(10 * step + rank)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if rank == 0 and step == 3:
            model.module[0].bias.grad[0] = float("inf")  # only on rank 0
        applied.append(scaler.step(opt))
        scaler.update()
    json.dump({{"applied": applied, "scale": scaler.get_scale(),
               "weights": [p.detach().flatten().tolist() for p in model.parameters()]}}, open(out, "w"))
    dist.barrier()  # both ranks done before gloo's threads are torn down (an abort at exit was seen under load)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ddp_overflow_on_one_rank_skips_on_both(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP.format(tests=str(REPO / "tests")))
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(outs[r])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r0, r1 = (json.loads(o.read_text()) for o in outs)
    assert r0["applied"] == r1["applied"] == [True, True, True, False, True, True]
    assert r0["scale"] == r1["scale"] == 2.0**15
    assert r0["weights"] == r1["weights"]


def digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(0.8 * len(y))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def train_digits(config, loss_factor=1.0, epochs=15):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = None
    if config is not None:
        model, scaler = prepare(model, opt, config)
    zero_grads = []
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=order)
        for i in range(0, len(ytr), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]) * loss_factor
            opt.zero_grad()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                zero_grads.append((model[0].weight.grad == 0).float().mean().item())
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                zero_grads.append((model[0].weight.grad == 0).float().mean().item())
                opt.step()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item() * 100
    return acc, sum(zero_grads) / len(zero_grads)


@pytest.mark.slow
def test_fp16_digits_with_dynamic_scaling_matches_fp32_and_underflows_without():
    pytest.importorskip("sklearn")
    fp16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    fp32_acc, _ = train_digits(None)
    scaled_acc, _ = train_digits(fp16.model_copy(update={"loss_scale": "dynamic"}))
    assert scaled_acc >= fp32_acc - 1.0, (scaled_acc, fp32_acc)
    # a loss this small: its float16 gradients flush to zero unless the loss is scaled
    tiny = 1e-6
    fp32_tiny, fp32_zeros = train_digits(None, tiny)
    unscaled_acc, unscaled_zeros = train_digits(fp16.model_copy(update={"loss_scale": None}), tiny)
    scaled_tiny_acc, scaled_zeros = train_digits(fp16.model_copy(update={"loss_scale": "dynamic"}), tiny)
    assert unscaled_zeros > 0.9 and unscaled_acc < 50, (unscaled_zeros, unscaled_acc)
    assert scaled_zeros < 0.5 and scaled_tiny_acc >= fp32_tiny - 1.0, (scaled_zeros, scaled_tiny_acc, fp32_tiny)
