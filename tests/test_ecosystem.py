"""A swapped model under torch.compile, DistributedDataParallel and FSDP2 (2 CPU processes on gloo)."""


import pytest
import torch
import torch.distributed.fsdp
from torch import nn

import lowbit
from tests.gloo import spawn_on_gloo

SWAP_ALL = {"filter_fn": lowbit.ALL}


class Block(nn.Module):
    """A pre-norm transformer block with nn.MultiheadAttention, as open_clip builds it."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def make_model(seed=0):
    torch.manual_seed(seed)
    return lowbit.swap(nn.Sequential(Block(), Block()), **SWAP_ALL)


def test_torch_compile_gives_the_same_outputs_and_grads():
    torch._dynamo.reset()
    model = make_model()
    x = torch.randn(2, 9, 32)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eval_forward_compiles_with_fullgraph(backend):
    """Eval + no_grad takes the int8 weight-cache path in eager; under compile it must trace
    without graph breaks (fullgraph=True raises on one) and give the eager outputs."""
    torch._dynamo.reset()
    model = make_model().eval()
    x = torch.randn(2, 9, 32)
    with lowbit.use_backend(backend), torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


def _ddp_worker(rank, world, x, target, grads_path):
    model = nn.parallel.DistributedDataParallel(make_model())
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss = (model(x[shard]) - target[shard]).square().mean()
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, grads_path)


def _fsdp2_worker(rank, world, x, target, grads_path):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in model:
        fully_shard(block)
    fully_shard(model)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss = (model(x[shard]) - target[shard]).square().mean()
    loss.backward()
    # Each rank holds half of every parameter; full_tensor() all-gathers the averaged gradient.
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, grads_path)


@pytest.mark.parametrize("worker", [_ddp_worker, _fsdp2_worker], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_whole_batch(worker, tmp_path):
    """DDP, and FSDP2's fully_shard over the swapped blocks (attention wrapper included): FSDP2's
    forward all-gathers the whole weight, so its int8 scale is the unsharded one. Row-wise scales
    make each sample's int8 values independent of the batch it shares, so the averaged gradients
    match one process up to fp32 summation order."""
    if worker is _fsdp2_worker and not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    torch.manual_seed(1)
    x, target = torch.randn(4, 9, 32), torch.randn(4, 9, 32)
    single = make_model()
    (single(x) - target).square().mean().backward()

    grads_path = tmp_path / "grads.pt"
    spawn_on_gloo(worker, x, target, grads_path)
    grads = torch.load(grads_path, weights_only=True)
    assert set(grads) == {n for n, _ in single.named_parameters()}
    for name, p in single.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
