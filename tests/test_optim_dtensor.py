"""StableAdamW on FSDP2-style sharded parameters (DTensor, 2 CPU processes on gloo).

The RMS is per tensor, not per shard: with parameters split over two processes, the clipped step
must equal the one taken on the whole tensor.
"""


import pytest
import torch

import lowbit
from tests.gloo import spawn_on_gloo

tensor_api = pytest.importorskip("torch.distributed.tensor")


def _grads(step):
    torch.manual_seed(100 + step)
    scale = 50.0 if step == 3 else 1.0  # a spike: clipping must act, and on the whole tensor's RMS
    return [torch.randn(8, 6) * scale, torch.randn(4) * scale]


def _run(params, foreach, to_param=lambda g, p: g):
    optimizer = lowbit.StableAdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
    rms = []
    for step in range(5):
        for p, g in zip(params, _grads(step)):
            p.grad = to_param(g, p)
        optimizer.step()
        rms.append([optimizer.state[p]["rms"].clone() for p in params])
    return rms


def _worker(rank, world, foreach, out_path):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    whole = (torch.randn(8, 6), torch.randn(4))
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in whole]
    rms = _run(params, foreach, lambda g, p: distribute_tensor(g, mesh, [Shard(0)]))
    full = [p.full_tensor() for p in params]
    if rank == 0:
        torch.save({"params": full, "rms": rms}, out_path)


@pytest.mark.parametrize("foreach", [False, True])
def test_sharded_steps_equal_whole_tensor_steps(foreach, tmp_path):
    out_path = tmp_path / "sharded.pt"
    spawn_on_gloo(_worker, foreach, out_path)
    sharded = torch.load(out_path, weights_only=True)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(4))]
    rms = _run(params, foreach)
    assert max(r.item() for r in rms[3]) > 1.0  # the spike was clipped
    for a, b in zip(sharded["params"], params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    for step_a, step_b in zip(sharded["rms"], rms):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
