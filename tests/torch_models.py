"""The PyTorch models and arrays of the torch tests, and factories for ``--torch``.

    $ mpiexec -n 2 python -m mpitrain train --torch torch_models:mlp --data DIR
"""
import numpy as np
import torch

FEATURES, CLASSES = 20, 3


def arrays(n: int = 600):
    """Features and labels the models learn (the label: the largest of 3 features)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    return x, x[:, :CLASSES].argmax(1).astype(np.int64)


class Branchy(torch.nn.Module):
    """An MLP with a branch it never uses (its parameters get no gradient)."""

    def __init__(self, features: int = FEATURES, classes: int = CLASSES):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(features, 32), torch.nn.ReLU())
        self.unused = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x))


def model(kind: str = "mlp", features: int = FEATURES, classes: int = CLASSES):
    """``mlp`` (with dropout), ``bn`` (BatchNorm and dropout) or ``branchy``; the same
    initial values on every rank (seeded)."""
    torch.manual_seed(0)
    if kind == "branchy":
        return Branchy(features, classes)
    norm = [torch.nn.BatchNorm1d(32)] if kind == "bn" else []
    return torch.nn.Sequential(torch.nn.Linear(features, 32), *norm, torch.nn.ReLU(),
                               torch.nn.Dropout(0.1), torch.nn.Linear(32, classes))


def mlp():
    """``--torch torch_models:mlp``: an MLP for the tests' small dataset (12 features,
    3 classes) with AdamW."""
    m = model("mlp", 12, 3)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3), torch.nn.functional.cross_entropy


def with_scheduler():
    """``--torch torch_models:with_scheduler``: SGD and a StepLR of its own."""
    m = model("bn", 12, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    return m, opt, torch.nn.functional.cross_entropy, \
        torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)


def wrong():
    """``--torch torch_models:wrong``: returns a model alone (refused)."""
    return model("mlp", 12, 3)


def raises():
    """``--torch torch_models:raises``."""
    raise ValueError("no GPU here")
