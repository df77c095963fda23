"""The small CNN trained from scratch on every subset, made deterministic given its seed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    """Training protocol, fixed once for every method, ratio and seed (not tuned per method).

    Adam with a constant learning rate, cross-entropy, ``epochs`` passes over the subset in
    shuffled mini-batches of ``batch_size`` (the last batch may be smaller).
    """

    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


class SmallCNN(nn.Module):
    """Two 3×3 conv layers (16, 32 channels, ReLU), 2×2 max-pool, one linear layer.

    Input (B, 1, 8, 8) images in [0, 1]; output (B, n_classes) logits. ``embed`` gives the
    (B, 512) penultimate features (the flattened pooled activations).
    """

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classify = nn.Linear(32 * 4 * 4, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(images))


def make_deterministic(device: str) -> None:
    """One CPU thread and deterministic kernels, so a seed fixes every accuracy exactly.

    On CUDA, deterministic cuBLAS needs its workspace configured before the first CUDA call.
    """
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def as_image_tensor(pixels: np.ndarray, device: str) -> torch.Tensor:
    """(N, 64) pixels in [0, 1] → (N, 1, 8, 8) float32 tensor on ``device``."""
    return torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8).to(device)


def train_model(
    images: torch.Tensor, labels: torch.Tensor, seed: int, config: TrainConfig
) -> SmallCNN:
    """Train a fresh ``SmallCNN`` on (N, 1, 8, 8) ``images`` and (N,) int64 ``labels``.

    ``seed`` fixes the initial weights (``torch.manual_seed``) and the mini-batch order (its own
    CPU generator), so the same seed gives every method the same initialisation.
    """
    torch.manual_seed(seed)
    model = SmallCNN().to(config.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    order_generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.epochs):
        permutation = torch.randperm(len(images), generator=order_generator).to(config.device)
        for batch in permutation.split(config.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of (N, 1, 8, 8) ``images`` whose argmax logit equals ``labels`` (N,)."""
    model.eval()
    return float((model(images).argmax(dim=1) == labels).double().mean())


@torch.no_grad()
def penultimate_features(model: SmallCNN, images: torch.Tensor) -> np.ndarray:
    """(N, 512) float64 penultimate features of (N, 1, 8, 8) ``images``."""
    model.eval()
    return model.embed(images).double().cpu().numpy()
