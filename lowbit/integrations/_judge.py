"""What both integrations do with a step's loss: judge it, the same on every rank, and log the events."""

from __future__ import annotations

import logging

import torch


def judge_step_loss(monitor, loss: torch.Tensor, logger: logging.Logger) -> None:
    """monitor.step on the loss averaged over the ranks (under torch.distributed), so every rank takes
    the same action: a "skip" or "rollback" on one rank only would leave the replicas apart."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss)
        loss /= torch.distributed.get_world_size()
    for event in monitor.step(loss):
        logger.warning(
            f"lowbit: SpikeMonitor {event['kind']} at step {event['step']} "
            f"(value {event['value']}), action {event['action']}"
        )
