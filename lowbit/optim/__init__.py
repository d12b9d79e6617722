"""Optimizers for low-precision training."""

from lowbit.optim.stable_adamw import StableAdamW

__all__ = ["StableAdamW"]
