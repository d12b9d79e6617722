"""Roofline model of one linear layer's fwd+bwd and of a StableAdamW step, from the launches the code makes.

    python -m benchmarks.roofline --tokens 8192 --dim 4096 [--json]

Nothing runs on a GPU: the layer runs on the meta device, torch ops are recorded by a TorchDispatchMode
and lowbit's Triton launchers are swapped for recorders that return meta outputs. Each launch gets the
bytes it reads and writes and its FLOPs; its predicted time is max(FLOPs / peak, bytes / bandwidth)
plus a launch overhead, from the table below (vendor peak numbers, dense). A model, not a
measurement: real kernels reach a fraction of peak.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit.int8.config import SwitchBackConfig
from lowbit.int8.functional import switchback_linear
from lowbit.optim import StableAdamW

# Dense peaks (TFLOP/s, TOP/s) and HBM bandwidth (TB/s): A100 SXM 80GB, H100 SXM, H200 SXM.
GPUS = {
    "A100": {"bf16": 312e12, "int8": 624e12, "bandwidth": 2.039e12},
    "H100": {"bf16": 989e12, "int8": 1979e12, "bandwidth": 3.35e12},
    "H200": {"bf16": 989e12, "int8": 1979e12, "bandwidth": 4.8e12},
}
LAUNCH_S = 3e-6  # per kernel launch, eager mode
_MATMULS = {"mm", "addmm", "bmm", "_int_mm"}
# Allocations, views and profiler markers: no kernel behind them.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "_unsafe_view", "detach",
              "_record_function_enter_new", "_record_function_exit"}


def _nbytes(values) -> int:
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            # an expanded view (the optimizer's per-tensor step sizes) reads only its storage
            total += min(v.numel() * v.element_size(), v.untyped_storage().nbytes())
        elif isinstance(v, (list, tuple)):
            total += _nbytes(v)
    return total


def _on_device(values) -> bool:
    """Whether an op touches a modelled (meta) tensor; host ops, like the CPU step counters, launch nothing."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            return True
        if isinstance(v, (list, tuple)) and _on_device(v):
            return True
    return False


class Recorder(TorchDispatchMode):
    """Collects one entry per launch: name, bytes read + written, FLOPs and their kind."""

    def __init__(self):
        super().__init__()
        self.launches = []
        self._paused = False

    def add(self, name, nbytes, flops=0, kind="bf16"):
        self.launches.append({"name": name, "bytes": nbytes, "flops": flops, "kind": kind})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        # (a copy from the host to the device counts: its output is on the modelled device)
        if self._paused or func.is_view or name in _NO_KERNEL or not (_on_device(args) or _on_device([out])):
            return out
        flops, kind = 0, "bf16"
        if name in _MATMULS:
            a, b = args[-2], args[-1]
            flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]
            kind = "int8" if a.dtype == torch.int8 else "bf16"
        self.add(name, _nbytes(args) + _nbytes([out]), flops, kind)
        return out

    @contextlib.contextmanager
    def paused(self):
        self._paused, previous = True, self._paused
        try:
            yield
        finally:
            self._paused = previous


@contextlib.contextmanager
def recorded_triton_launchers(rec: Recorder):
    """lowbit.kernels' launchers replaced by recorders that count their traffic and return meta outputs."""
    import triton

    from lowbit import kernels

    rowwise = importlib.import_module("lowbit.kernels.quantize_rowwise")

    def quantize(name, transposed):
        def launcher(x, **kwargs):
            m, k = x.shape
            with rec.paused():
                q = torch.empty((k, m) if transposed else (m, k), dtype=torch.int8, device=x.device)
                n_scales = {"quantize_rowwise": m, "quantize_colwise_transposed": k}.get(name, 1)
                scales = torch.empty(n_scales if n_scales > 1 else (), device=x.device)
            passes = 1 if name == "quantize_rowwise" else 2  # absmax pass, then the quantize pass
            rec.add(name, passes * x.numel() * x.element_size() + q.numel() + 4 * max(n_scales, 1))
            return q, scales
        return launcher

    def int8_matmul_dequant(a, b, a_absmax, b_absmax, *, bias=None, out_dtype=torch.float32):
        (m, k), n = a.shape, b.shape[1]
        with rec.paused():
            out = torch.empty((m, n), dtype=out_dtype, device=a.device)
        reads = m * k + k * n + _nbytes([a_absmax, b_absmax, bias])
        rec.add("int8_matmul_dequant", reads + out.numel() * out.element_size(), 2 * m * n * k, "int8")
        return out

    def quantize_rowwise_column_sums(x):
        (m, k), programs = x.shape, triton.cdiv(x.shape[0], rowwise.rows_per_program(x.shape[0]))
        with rec.paused():
            q = torch.empty((m, k), dtype=torch.int8, device=x.device)
            scales, sums = torch.empty(m, device=x.device), torch.empty(k, device=x.device)
        # one read of x; q, the row scales and each program's fp32 column sums written ...
        rec.add("quantize_rowwise_column_sums", x.numel() * x.element_size() + q.numel() + 4 * m + 4 * programs * k)
        rec.add("sum", 4 * programs * k + 4 * k)  # ... and the reduce over programs
        return q, scales, sums

    def quantize_tensorwise_and_transpose(x):
        with rec.paused():
            q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
            q_t, scale = torch.empty(x.shape[::-1], dtype=torch.int8, device=x.device), torch.empty((), device=x.device)
        rec.add("quantize_tensorwise_and_transpose", 2 * x.numel() * x.element_size() + 2 * q.numel() + 4)
        return q, q_t, scale

    def dequantize_rowwise(q, absmax, dtype):
        with rec.paused():
            out = torch.empty(q.shape, dtype=dtype, device=q.device)
        rec.add("dequantize_rowwise", q.numel() + 4 * absmax.numel() + out.numel() * out.element_size())
        return out

    def mm_dequant_rows(a, q, absmax):
        (m, k), n = a.shape, q.shape[1]
        with rec.paused():
            out = torch.empty((m, n), dtype=a.dtype, device=a.device)
        nbytes = a.numel() * a.element_size() + q.numel() + 4 * absmax.numel() + out.numel() * out.element_size()
        rec.add("mm_dequant_rows", nbytes, 2 * m * n * k, "bf16")
        return out

    # lowbit.int8.ops calls the launch_* entries (it has checked the inputs already).
    originals = {name: getattr(kernels, name) for name in ("launch_quantize_rowwise", "launch_quantize_tensorwise",
                                                          "launch_quantize_rowwise_column_sums",
                                                          "launch_dequantize_rowwise", "launch_mm_dequant_rows",
                                                          "launch_quantize_tensorwise_and_transpose",
                                                          "launch_quantize_colwise_transposed",
                                                          "launch_int8_matmul_dequant")}
    kernels.launch_quantize_rowwise = quantize("quantize_rowwise", False)
    kernels.launch_quantize_colwise_transposed = quantize("quantize_colwise_transposed", True)
    tensorwise = quantize("quantize_tensorwise", False)
    tensorwise_t = quantize("quantize_tensorwise", True)
    kernels.launch_quantize_tensorwise = lambda x, *, transpose=False: (tensorwise_t if transpose else tensorwise)(x)
    kernels.launch_int8_matmul_dequant = int8_matmul_dequant
    kernels.launch_quantize_rowwise_column_sums = quantize_rowwise_column_sums
    kernels.launch_dequantize_rowwise = dequantize_rowwise
    kernels.launch_mm_dequant_rows = mm_dequant_rows
    kernels.launch_quantize_tensorwise_and_transpose = quantize_tensorwise_and_transpose
    # Nothing is interpreted (the launchers are swapped out), but lowbit's triton backend takes
    # non-CUDA tensors only under the interpreter's flag, read at each call.
    flag = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with lowbit.use_backend("triton"):
            yield
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
        if flag is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = flag


def record_layer(tokens: int, dim_in: int, dim_out: int, config: SwitchBackConfig | None) -> list[dict]:
    """Launches of one fwd+bwd of a (tokens, dim_in) -> dim_out bf16 layer (nn.Linear if config is None)."""
    x = torch.empty(tokens, dim_in, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(dim_out, dim_in, dtype=torch.bfloat16, device="meta", requires_grad=True)
    b = torch.empty(dim_out, dtype=torch.bfloat16, device="meta", requires_grad=True)
    rec = Recorder()
    launchers = recorded_triton_launchers(rec) if config is not None else contextlib.nullcontext()
    with launchers, rec:
        out = switchback_linear(x, w, b, config=config) if config is not None else F.linear(x, w, b)
        out.backward(torch.empty_like(out))
    return rec.launches


def record_optimizer_step(dim_in: int, dim_out: int) -> list[dict]:
    """Launches of one StableAdamW foreach step (after the first) on the layer's weight and bias, fp32."""
    params = [torch.empty(dim_out, dim_in, device="meta"), torch.empty(dim_out, device="meta")]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = StableAdamW(params, weight_decay=0.1, foreach=True)
    opt.step()
    rec = Recorder()
    with rec:
        opt.step()
    return rec.launches


class _KernelRecorder:
    """Stands in for a Triton kernel: `kernel[grid](**kwargs)` adds one launch with the bytes that
    `traffic(kwargs)` gives for it (the kernel's loads and stores, read off its code)."""

    def __init__(self, rec: Recorder, name: str, traffic):
        self.rec, self.name, self.traffic = rec, name, traffic

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.rec.add(self.name, self.traffic(kwargs))
        return launch


def triton_optimizer_step(dim_in: int, dim_out: int) -> list[dict]:
    """Launches of StableAdamW's Triton step (lowbit/kernels/stable_adamw.py) on the layer's fp32
    weight and bias, recorded from the code on meta tensors: each Triton kernel with its loads and
    stores, each torch op with its reads and writes, the host-to-device copies of the tables."""
    from lowbit.kernels import stable_adamw as kernel

    params = [torch.empty(dim_out, dim_in, device="meta"), torch.empty(dim_out, device="meta")]
    grads, exp_avgs, exp_avg_sqs = ([torch.empty_like(p) for p in params] for _ in range(3))
    n, elt = sum(p.numel() for p in params), params[0].element_size()
    layout = kernel.block_layout(tuple(p.numel() for p in params), torch.device("meta"))
    blocks, tensors = layout[0].numel(), len(params)
    rec = Recorder()
    traffic = {
        "_moments_kernel": lambda kw: elt * n + 16 * n + 4 * blocks,  # g read; v, u read and written; block sums
        "_sums_kernel": lambda kw: 4 * blocks + 4 * tensors,
        "_update_kernel": lambda kw: 2 * elt * n + 8 * n,  # p read and written; v, u read
    }
    originals = {name: getattr(kernel, name) for name in traffic}
    try:
        for name, count in traffic.items():
            setattr(kernel, name, _KernelRecorder(rec, name, count))
        rms_states = [torch.empty((), device="meta") for _ in params]
        with rec:
            rms = kernel.stable_adamw_step(params, grads, exp_avgs, exp_avg_sqs, [0.1, 0.9, 0.1] * tensors,
                                           layout, lr=1e-3, eps=1e-6, weight_decay=0.1, clip_threshold=1.0)
            torch._foreach_copy_(rms_states, list(rms.unbind(0)))  # as StableAdamW._triton_step stores them
    finally:
        for name, fn in originals.items():
            setattr(kernel, name, fn)
    return rec.launches


def fused_adamw_step(dim_in: int, dim_out: int) -> list[dict]:
    """torch.optim.AdamW(fused=True) on the same fp32 tensors: one pass reading p, g, m, v and
    writing p, m, v (28 B per parameter), one launch (a model of its traffic, not a recording)."""
    n = dim_out * dim_in + dim_out
    return [{"name": "_fused_adamw_", "bytes": 28 * n, "flops": 0, "kind": "bf16"}]


def predict(launches: list[dict], gpu: dict, launch_s: float = LAUNCH_S) -> float:
    """Seconds: each launch bound by compute or by memory, plus its launch overhead (launch_s = 0 gives
    the design's ceiling: what no scheduling of these launches can beat)."""
    return sum(max(op["flops"] / gpu[op["kind"]], op["bytes"] / gpu["bandwidth"]) + launch_s for op in launches)


def minimum_bytes(tokens: int, dim_in: int, dim_out: int) -> int:
    """The least a bf16 SwitchBack fwd+bwd with bias can touch: 8 B per element of x and of the output
    (x read twice, g read twice and grad_x / out written, or their int8 copies), 10 B per weight
    element (read twice, written as int8 twice), the bias gradient folded into the pass over g."""
    return 8 * tokens * dim_in + 8 * tokens * dim_out + 10 * dim_in * dim_out


def run(tokens: int, dim_in: int, dim_out: int, launch_s: float = LAUNCH_S) -> dict:
    cases = {
        "switchback": record_layer(tokens, dim_in, dim_out, SwitchBackConfig()),
        "switchback_mem_efficient": record_layer(tokens, dim_in, dim_out, SwitchBackConfig(mem_efficient=True)),
        "switchback_rowwise": record_layer(tokens, dim_in, dim_out, SwitchBackConfig(weight_quant="row")),
        "nn_linear": record_layer(tokens, dim_in, dim_out, None),
        "stable_adamw_step": record_optimizer_step(dim_in, dim_out),
        "stable_adamw_triton_step": triton_optimizer_step(dim_in, dim_out),
        "fused_adamw_step": fused_adamw_step(dim_in, dim_out),
    }
    return {
        "shape": {"tokens": tokens, "dim_in": dim_in, "dim_out": dim_out},
        "model": "max(flops / peak, bytes / bandwidth) + launch overhead per launch; not a measurement",
        "gpus": GPUS,
        "launch_s": launch_s,
        "cases": {
            name: {
                "launches": launches,
                "bytes": sum(op["bytes"] for op in launches),
                "byte_ratio": sum(op["bytes"] for op in launches) / minimum_bytes(tokens, dim_in, dim_out),
                "flops": sum(op["flops"] for op in launches),
                "predicted_s": {gpu: predict(launches, spec, launch_s) for gpu, spec in GPUS.items()},
            }
            for name, launches in cases.items()
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096, help="input features")
    parser.add_argument("--dim-out", type=int, default=None, help="output features (default: 4 * dim)")
    parser.add_argument("--launch-us", type=float, default=LAUNCH_S * 1e6,
                        help="overhead per launch in microseconds (0: the design's ceiling)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    if args.launch_us < 0:
        parser.error(f"--launch-us must be >= 0, got {args.launch_us}")
    result = run(args.tokens, args.dim, args.dim_out or 4 * args.dim, args.launch_us * 1e-6)
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    print(f"model ({result['model']}), shape {result['shape']}")
    header = f"{'case':28} {'launches':>8} {'GB':>8} {'/ min':>6} {'TFLOP':>8} "
    print(header + " ".join(f"{g + ' us':>10}" for g in GPUS))
    for name, case in result["cases"].items():
        times = " ".join(f"{case['predicted_s'][g] * 1e6:10.1f}" for g in GPUS)
        ratio = f"{case['byte_ratio']:6.3f}" if not name.endswith("_step") else f"{'':6}"
        print(f"{name:28} {len(case['launches']):8d} {case['bytes'] / 1e9:8.3f} {ratio} "
              f"{case['flops'] / 1e12:8.3f} {times}")
    return result


if __name__ == "__main__":
    main()
