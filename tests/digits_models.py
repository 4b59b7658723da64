"""A digits CNN (sklearn's 8x8 digits, trained in fp32 in a second) whose last Linear is bf16-sensitive.

The sensitive layer: a large common offset (2**14) is added to every logit through the last Linear's
bias. argmax is unchanged in float32, but bfloat16 has 8 significant bits, so at 16384 it rounds in
steps of 128 and every logit of a sample rounds to the same value: argmax is then class 0, chance.
Shared by tests/test_tune_torch.py and tests/test_inc.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

OFFSET = 2.0**14


@dataclass
class Digits:
    model: torch.nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def accuracy(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(self.x_test).argmax(1) == self.y_test).float().mean())


def make_cnn() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(16 * 16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def train_digits(seed: int = 0) -> Digits:
    """Train the CNN in fp32 (seeded; about a second on two cores)."""
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is many times faster on a busy 2-core machine
    try:
        return _train(load_digits(), seed)
    finally:
        torch.set_num_threads(threads)


def _train(data: object, seed: int) -> Digits:
    torch.manual_seed(seed)
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # type: ignore[attr-defined]
    y = torch.tensor(data.target)  # type: ignore[attr-defined]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1300], perm[1300:]
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys = x[tr], y[tr]
    for _ in range(15):
        order = torch.randperm(len(xs))
        for i in range(0, len(xs), 100):
            idx = order[i:i + 100]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    return Digits(model, xs, ys, x[te], y[te])


def make_sensitive(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """Add OFFSET to every logit (the last Linear's bias): fp32 argmax unchanged, bf16 rounding destroys it."""
    with torch.no_grad():
        model[-1].bias += OFFSET
    return model


# ---------------------------------------------------------------------- fixtures (imported by the test modules)
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while a module's tests run: tiny models train much faster on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> Digits:
    """The digits CNN trained once per test module."""
    return train_digits()


@pytest.fixture()
def sensitive(digits: Digits) -> torch.nn.Sequential:
    """A copy of the trained CNN whose last Linear is bf16-sensitive."""
    return make_sensitive(copy.deepcopy(digits.model))
