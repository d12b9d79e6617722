"""StableAdamW's step for many tensors in a handful of launches (lowbit/optim/stable_adamw.py holds the rule).

The tensors of a bucket (one device, one dtype) are cut into blocks of BLOCK elements; a block knows
its tensor through a table, and reaches that tensor's parameter, gradient and state through tables of
addresses, so one launch covers every tensor whatever their count and sizes:

    1. moments:  v = lerp(v, g, 1 - b1_hat); u = b2_hat u + (1 - b2_hat) g^2; and per block the sum of
                 g^2 / max(u, eps^2)
    2. sums:     one program per tensor adds its blocks' sums in order (no atomics: reruns are
                 bit-identical)
    then, in torch on T-sized tensors, RMS = sqrt(sum / numel) and eta = lr / max(1, RMS / clip)
    3. update:   theta = theta - eta (v / (sqrt(u) + eps) + wd theta), in fp32, rounded once to theta's dtype

The arithmetic is the foreach path's, op for op, with fp32 division and square root correctly
rounded (div_rn, sqrt_rn) and no multiply-add contraction, so the two agree to fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, LAUNCH_OPTIONS, _cast_rne

BLOCK = 256 if INTERPRET else 2048  # elements per program (the interpreter runs each in Python)
_WARPS = 4 if INTERPRET else 8
_SUM_CHUNK = 64  # blocks a sums program reads per iteration


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula: start + w (end - start) for w < 0.5, else end - (end - start) (1 - w)."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _moments_kernel(
    grad_table, exp_avg_table, exp_avg_sq_table, numels, hyper,
    block_tensor, block_start, block_sums,
    eps_sq,
    GRAD_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.load(numels + t)
    g = tl.load(tl.load(grad_table + t).to(tl.pointer_type(GRAD_DTYPE)) + offs, mask=mask, other=0.0)
    g = g.to(tl.float32)
    v_ptr = tl.load(exp_avg_table + t).to(tl.pointer_type(tl.float32)) + offs
    u_ptr = tl.load(exp_avg_sq_table + t).to(tl.pointer_type(tl.float32)) + offs
    one_minus_beta1_hat = tl.load(hyper + 3 * t)
    beta2_hat = tl.load(hyper + 3 * t + 1)
    one_minus_beta2_hat = tl.load(hyper + 3 * t + 2)

    v = _lerp(tl.load(v_ptr, mask=mask, other=0.0), g, one_minus_beta1_hat)
    # addcmul's order: u + (value * g) * g
    u = tl.load(u_ptr, mask=mask, other=0.0) * beta2_hat + (one_minus_beta2_hat * g) * g
    tl.store(v_ptr, v, mask=mask)
    tl.store(u_ptr, u, mask=mask)
    ratio = tl.math.div_rn(g * g, tl.maximum(u, eps_sq))
    tl.store(block_sums + pid, tl.sum(tl.where(mask, ratio, 0.0), axis=0))


@triton.jit
def _sums_kernel(block_sums, first_block, sums, CHUNK: tl.constexpr):
    """sums[t] = the blocks of tensor t added in order, CHUNK at a time."""
    t = tl.program_id(0)
    start = tl.load(first_block + t)
    end = tl.load(first_block + t + 1)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for b0 in range(start, end, CHUNK):
        offs = b0 + tl.arange(0, CHUNK)
        acc += tl.load(block_sums + offs, mask=offs < end, other=0.0)
    tl.store(sums + t, tl.sum(acc, axis=0))


@triton.jit
def _update_kernel(
    param_table, exp_avg_table, exp_avg_sq_table, numels, etas,
    block_tensor, block_start,
    eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.load(numels + t)
    p_ptr = tl.load(param_table + t).to(tl.pointer_type(PARAM_DTYPE)) + offs
    v = tl.load(tl.load(exp_avg_table + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    u = tl.load(tl.load(exp_avg_sq_table + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    update = tl.math.div_rn(v, tl.sqrt_rn(u) + eps)
    if HAS_WEIGHT_DECAY:
        update = update + weight_decay * p
    p = p - update * tl.load(etas + t)
    tl.store(p_ptr, _cast_rne(p, PARAM_DTYPE), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def block_layout(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block_tensor, block_start, first_block) for tensors of these sizes: which tensor each block is
    in, where in it the block starts, and each tensor's first block (T + 1 entries)."""
    blocks = [triton.cdiv(n, BLOCK) for n in numels]
    first = torch.tensor([0, *blocks], dtype=torch.int64).cumsum(0)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks))
    block_start = (torch.arange(int(first[-1]), dtype=torch.int64) - first[:-1].repeat_interleave(torch.tensor(blocks)))
    return block_tensor.to(device), (block_start * BLOCK).to(device), first.to(device)


def _address_table(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def stable_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    hyper: list[float],
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    lr: float,
    eps: float,
    weight_decay: float,
    clip_threshold: float,
) -> torch.Tensor:
    """One step on dense, contiguous tensors of one device and dtype (fp32 state); returns RMS (T,).

    hyper holds (1 - b1_hat, b2_hat, 1 - b2_hat) per tensor; layout is block_layout of their sizes.
    """
    device = params[0].device
    count = len(params)
    # One host-to-device copy for everything that changes from step to step (gradients are new
    # tensors after zero_grad(set_to_none=True); the betas follow each tensor's step).
    host = torch.tensor(
        [*_address_table(grads), *_address_table(exp_avgs), *_address_table(exp_avg_sqs),
         *_address_table(params), *[p.numel() for p in params]],
        dtype=torch.int64,
    )
    host_hyper = torch.tensor(hyper, dtype=torch.float32)
    if device.type == "cuda":  # pinned, so the copies do not wait for the queue
        host, host_hyper = host.pin_memory(), host_hyper.pin_memory()
    tables = host.to(device, non_blocking=True).view(5, count)
    hyper_d = host_hyper.to(device, non_blocking=True)
    block_tensor, block_start, first_block = layout
    n_blocks = block_tensor.numel()

    block_sums = torch.empty(n_blocks, dtype=torch.float32, device=device)
    if n_blocks:
        _moments_kernel[(n_blocks,)](
            grad_table=tables[0], exp_avg_table=tables[1], exp_avg_sq_table=tables[2], numels=tables[4],
            hyper=hyper_d, block_tensor=block_tensor, block_start=block_start, block_sums=block_sums,
            eps_sq=eps * eps,
            GRAD_DTYPE=_TL_DTYPES[grads[0].dtype], BLOCK=BLOCK, num_warps=_WARPS, **LAUNCH_OPTIONS,
        )
    sums = torch.empty(count, dtype=torch.float32, device=device)
    _sums_kernel[(count,)](
        block_sums=block_sums, first_block=first_block, sums=sums, CHUNK=_SUM_CHUNK, **LAUNCH_OPTIONS
    )
    # RMS = sqrt(mean(g^2 / max(u, eps^2))); eta = lr / max(1, RMS / clip_threshold): device tensors
    rms = sums.div_(tables[4].clamp_min(1).to(torch.float32)).sqrt_()
    etas = rms.div(clip_threshold).clamp_min_(1.0).reciprocal_().mul_(lr)
    if n_blocks:
        _update_kernel[(n_blocks,)](
            param_table=tables[3], exp_avg_table=tables[1], exp_avg_sq_table=tables[2], numels=tables[4],
            etas=etas, block_tensor=block_tensor, block_start=block_start,
            eps=eps, weight_decay=weight_decay,
            PARAM_DTYPE=_TL_DTYPES[params[0].dtype], HAS_WEIGHT_DECAY=weight_decay != 0.0,
            BLOCK=BLOCK, num_warps=_WARPS, **LAUNCH_OPTIONS,
        )
    return rms
