"""Small models and training loops shared by the monitor tests."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """embed -> act -> head, plus `unused`, which the forward never touches (grad stays None)."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.head = nn.Linear(d_hidden, d_out)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.embed(x)))


def regression_batches(n_steps: int, *, batch: int = 64, d_in: int = 8, d_out: int = 4, seed: int = 0):
    """A fixed linear teacher plus noise: a smooth, well-behaved problem."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d_in, d_out, generator=gen) / d_in**0.5
    for _ in range(n_steps):
        x = torch.randn(batch, d_in, generator=gen)
        y = x @ teacher + 0.1 * torch.randn(batch, d_out, generator=gen)
        yield x, y


def train_step(model, optimizer, x, y, *, grad_scale: dict[str, float] | None = None) -> torch.Tensor:
    """One forward/backward/step; `grad_scale` multiplies named parameters' gradients (an injected spike)."""
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if grad_scale:
        params = dict(model.named_parameters())
        for name, scale in grad_scale.items():
            params[name].grad.mul_(scale)
    optimizer.step()
    return loss.detach()
