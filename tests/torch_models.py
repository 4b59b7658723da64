"""Small real models shared by the torch tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn + identity, relu."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + x)


class ConvBNDropNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> Dropout -> mean -> Linear: running statistics and a train/eval switch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).mean(dim=(2, 3)))


def mlp(d_in: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, classes))


def resnet_cnn(channels: int = 16, classes: int = 10, in_ch: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_ch, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        BasicBlock(channels), BasicBlock(channels),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes),
    )


def transformer_layer(d_model: int = 64, heads: int = 4, d_ff: int = 128) -> nn.Module:
    return nn.TransformerEncoderLayer(d_model, heads, d_ff, batch_first=True)


def models_and_inputs(seed: int = 0) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(seed)
    return {
        "mlp": (mlp(), torch.randn(16, 64)),
        "cnn": (resnet_cnn(), torch.randn(4, 1, 8, 8)),
        "transformer": (transformer_layer(), torch.randn(2, 10, 64)),
    }
