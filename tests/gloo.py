"""Runs a test function in two CPU processes joined by gloo.

The processes end with os._exit once both ranks have passed a barrier, skipping gloo's teardown:
under load, gloo's threads can abort a process ("terminate called without an active exception",
SIGABRT) while the group is destroyed, after the work was done and saved, which failed tests at
random. An exception in `fn` still reaches the parent, which spawn then fails.
"""

import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    fn(rank, world, *args)
    dist.barrier()  # both ranks are done with every collective
    os._exit(0)


def spawn_on_gloo(fn, *args, world: int = 2) -> None:
    """Calls fn(rank, world, *args) in `world` processes with a gloo process group set up."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
