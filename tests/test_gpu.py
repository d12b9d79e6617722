"""The SwitchBack layer through the compiled Triton kernels at realistic sizes, and under FSDP2.

Marked `gpu`: skipped without CUDA, run whenever a GPU is lent.
"""

import os
import socket

import pytest
import torch
from torch import nn

import lowbit
from lowbit.int8.config import SwitchBackConfig
from lowbit.int8.functional import switchback_linear
from tests.reference import dequantize_ref, quantize_ref, sqnr_db

pytestmark = pytest.mark.gpu


def fake_quant(x, dim):
    return dequantize_ref(*quantize_ref(x, dim))


@pytest.mark.parametrize("weight_quant", ["tensor", "row"])
def test_layer_at_vit_huge_mlp_size(weight_quant):
    """32768 tokens, 1280 -> 5120, bf16: every gemm against fp64 math from the rule, on the GPU."""
    torch.manual_seed(0)
    config = SwitchBackConfig(weight_quant=weight_quant)
    x = torch.randn(32768, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer = nn.Linear(1280, 5120, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(32768, 5120, device="cuda", dtype=torch.bfloat16)
    with lowbit.use_backend("triton"):
        out = switchback_linear(x, layer.weight, layer.bias, config=config)
        out.backward(g)

    xd, wd, gd = x.detach().double(), layer.weight.detach().double(), g.double()
    w_dim, w_t_dim = (None, None) if weight_quant == "tensor" else (1, 0)
    ref_out = fake_quant(xd, 1) @ fake_quant(wd, w_dim).T + layer.bias.double()
    assert sqnr_db(ref_out, out) >= 45  # bf16 output rounding bounds it
    del ref_out
    assert sqnr_db(fake_quant(gd, 1) @ fake_quant(wd, w_t_dim), x.grad) >= 45
    assert sqnr_db(gd.T @ xd, layer.weight.grad) >= 40  # bf16 GEMM over 32768 rows
    assert sqnr_db(xd @ wd.T + layer.bias.double(), out) >= 38  # vs exact linear: the int8 error


def test_triton_and_torch_backends_agree_on_gpu():
    torch.manual_seed(0)
    layer = lowbit.SwitchBackLinear(1024, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 1000, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with lowbit.use_backend("triton"):
            fast = layer(x)
        with lowbit.use_backend("torch"):
            slow = layer(x)
    assert sqnr_db(slow.float(), fast.float()) >= 50


def test_compiled_model_with_triton_kernels():
    torch.manual_seed(0)
    model = lowbit.swap(
        nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).cuda().bfloat16(),
        filter_fn=lowbit.ALL,
    )
    x = torch.randn(8, 128, 512, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    # fullgraph=True: a graph break around the Triton launchers raises instead of falling back to eager.
    compiled = torch.compile(model, fullgraph=True)(x)
    assert sqnr_db(eager.float(), compiled.float()) >= 40


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_fully_shard_matches_unsharded():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        def build():
            torch.manual_seed(0)
            blocks = [nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)) for _ in range(2)]
            return lowbit.swap(nn.Sequential(*blocks).cuda(), filter_fn=lowbit.ALL)

        plain, sharded = build(), build()
        for block in sharded:
            fully_shard(block)
        fully_shard(sharded)
        x = torch.randn(4, 256, 768, device="cuda")
        plain(x).square().mean().backward()
        sharded(x).square().mean().backward()
        for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(b.grad.full_tensor(), a.grad, msg=name)
    finally:
        torch.distributed.destroy_process_group()
