"""The int8 kernels SwitchBack is built from: achieved bandwidth against a device-to-device copy.

The quantize kernels are memory-bound: GB/s = (bytes of x read + int8 q written + fp32 scales
written) / median time, counting each byte once (a two-pass kernel that reads x twice still gets
credit for one read). Their target is >= 80% of the bandwidth of `y.copy_(x)` measured on the same
shapes in the same run ("frac_of_copy_bw" in a record's extra).

The int8 GEMM with its dequantize epilogue is compute-bound: TFLOP/s, with speed-up against a
16-bit `torch.mm` of the same shape and `torch._int_mm` (int8 -> int32, no epilogue) beside it.

Implementations: "triton" (lowbit.kernels, timed only on a GPU) and "torch-ref" (lowbit.int8.ops'
plain-torch twin, the path CPU tensors take).
"""

from __future__ import annotations

import importlib
import os
from functools import partial

import torch

from benchmarks.common import Recorder, Settings, Skip, attach_speedups, free_memory, measure

__all__ = ["QUANTIZE_OPS", "run"]

COPY = "copy"
MM_BASELINE = "torch.mm"

# case -> (lowbit op name, keyword arguments, number of fp32 scales for an (M, K) input)
QUANTIZE_OPS = {
    "quantize_rowwise": ("quantize_rowwise", {}, lambda m, k: m),
    "quantize_tensorwise": ("quantize_tensorwise", {}, lambda m, k: 1),
    "quantize_tensorwise transpose": ("quantize_tensorwise", {"transpose": True}, lambda m, k: 1),
    "quantize_colwise_transposed": ("quantize_colwise_transposed", {}, lambda m, k: k),
}


def _interpreted() -> bool:
    """Tests run the "triton" rows on the CPU under Triton's interpreter, to check the plumbing only."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LOWBIT_BENCH_INTERPRET") == "1"


def _triton_op(name: str, settings: Settings):
    if settings.device.type != "cuda" and not _interpreted():
        raise Skip("Triton kernels are timed only on a CUDA GPU (on the CPU they run in Triton's interpreter)")
    try:
        kernels = importlib.import_module("lowbit.kernels")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a kernel module failing at import
        raise Skip(f"lowbit.kernels does not import: {type(exc).__name__}: {exc}") from None
    op = getattr(kernels, name, None)
    if op is None:
        raise Skip(f"lowbit.kernels.{name} is not available in this version of lowbit")
    return op


def _torch_ref_op(name: str, settings: Settings):
    from lowbit import use_backend
    from lowbit.int8 import ops

    op = getattr(ops, name)

    def call(*args, **kwargs):
        with use_backend("torch"):
            return op(*args, **kwargs)

    return call


def _quantize_shape(m: int, k: int, settings: Settings, rec: Recorder) -> None:
    shape = {"rows": m, "cols": k}
    torch.manual_seed(0)
    x = torch.randn(m, k, device=settings.device, dtype=settings.dtype)
    x_bytes = x.numel() * x.element_size()
    try:
        y = torch.empty_like(x)
        timing = measure(partial(y.copy_, x), settings.device, settings.timer)
        rec.ok(COPY, COPY, shape, timing, bytes_moved=2 * x_bytes)
    except Exception as exc:  # noqa: BLE001 - recorded, the suite goes on
        rec.fail(COPY, COPY, shape, exc)

    for case, (name, kwargs, n_scales) in QUANTIZE_OPS.items():
        moved = x_bytes + x.numel() + 4 * n_scales(m, k)  # x read, int8 q and fp32 scales written
        for impl, make in (("triton", _triton_op), ("torch-ref", _torch_ref_op)):
            if not settings.wants(impl, COPY):
                continue
            try:
                timing = measure(partial(make(name, settings), x, **kwargs), settings.device, settings.timer)
                rec.ok(case, impl, shape, timing, bytes_moved=moved)
            except Exception as exc:  # noqa: BLE001
                rec.fail(case, impl, shape, exc)


def _matmul_shape(m: int, k: int, settings: Settings, rec: Recorder) -> None:
    from lowbit import use_backend
    from lowbit.int8 import ops

    case = "int8_matmul_dequant d->4d"
    n = 4 * k
    shape = {"tokens": m, "in": k, "out": n}
    torch.manual_seed(0)
    x = torch.randn(m, k, device=settings.device, dtype=settings.dtype)
    w = torch.randn(n, k, device=settings.device, dtype=settings.dtype)
    with use_backend("torch"):  # the operands only; how they are made is not timed here
        a, a_absmax = ops.quantize_rowwise(x)
        w_int8, w_absmax = ops.quantize_tensorwise(w)
    b = w_int8.t()  # (K, N) column-major: the layout x @ w.T hands the GEMM, cuBLAS's fast int8 one

    def int_mm():
        if settings.device.type == "cuda" and m <= 16:
            raise Skip("torch._int_mm on CUDA needs more than 16 rows")
        return partial(torch._int_mm, a, b)

    def lowbit_op(make):
        op = make("int8_matmul_dequant", settings)
        return partial(op, a, b, a_absmax, w_absmax, out_dtype=settings.dtype)

    impls = {
        MM_BASELINE: lambda: partial(torch.mm, x, w.t()),
        "torch._int_mm": int_mm,
        "triton": partial(lowbit_op, _triton_op),
        "torch-ref": partial(lowbit_op, _torch_ref_op),
    }
    for impl, make in impls.items():
        if not settings.wants(impl, MM_BASELINE):
            continue
        try:
            timing = measure(make(), settings.device, settings.timer)
            rec.ok(case, impl, shape, timing, flops=2 * m * k * n)
        except Exception as exc:  # noqa: BLE001
            rec.fail(case, impl, shape, exc)


def run(settings: Settings, rec: Recorder) -> list:
    for m, k in settings.quant_shapes:
        _quantize_shape(m, k, settings, rec)
        free_memory(settings.device)
    for m, k in settings.quant_shapes:
        _matmul_shape(m, k, settings, rec)
        free_memory(settings.device)

    # Quantize kernels against the copy of the same shape; the GEMM against torch.mm.
    def baseline_of(r):
        return MM_BASELINE if r.case.startswith("int8_matmul") else COPY

    by_shape = {}
    for r in rec.records:
        if r.impl == COPY and r.status == "ok":
            by_shape[tuple(sorted(r.shape.items()))] = r
    for r in rec.records:
        copy = by_shape.get(tuple(sorted(r.shape.items())))
        if r.status == "ok" and r.gbps and copy is not None and r.impl != COPY:
            r.extra["copy_gbps"] = copy.gbps
            r.extra["frac_of_copy_bw"] = r.gbps / copy.gbps
            r.baseline, r.speedup = COPY, copy.median_ms / r.median_ms
    attach_speedups([r for r in rec.records if r.case.startswith("int8_matmul")], baseline_of)
    for r in rec.records:
        if r.case == COPY:
            r.baseline = COPY
    return rec.records
