"""Compile every autotune config of every Triton kernel in lowbit.kernels for one GPU generation,
without a GPU, and report what ptxas made of it.

    python -m tests.kernels.compile_targets 90      # sm_90a; prints one JSON object per line

Run it as its own process: it needs TRITON_INTERPRET unset (it unsets it before importing triton),
so triton.jit builds real kernels and the modules pick their GPU configs instead of the
interpreter's. Each launcher is called once on CPU tensors of a representative shape with the kernels'
`run` swapped for a recorder, so the compiled argument types and specialisations (int8 pointers,
unit strides, divisibility by 16) are exactly the ones a launch on a GPU would compile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# import_module: lowbit.kernels re-exports functions under their modules' names.
_common, dequantize_rowwise, int8_matmul, mm_dequant_rows, quantize_rowwise, quantize_tiled, stable_adamw = (
    importlib.import_module(f"lowbit.kernels.{name}")
    for name in ("_common", "dequantize_rowwise", "int8_matmul", "mm_dequant_rows", "quantize_rowwise",
                 "quantize_tiled", "stable_adamw")
)
MODULES = (dequantize_rowwise, int8_matmul, mm_dequant_rows, quantize_rowwise, quantize_tiled, stable_adamw)
# Usable shared memory per block: A100 163 KiB, H100/H200 227 KiB (CUDA programming guide, table 21).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
WARP_SIZE = 32
# Per SM: shared memory (KiB, of which 1 KiB per block is reserved), 64 K registers, 64 warps (A100, H100).
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGISTERS_PER_SM, WARPS_PER_SM = 65536, 64
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_MMA = re.compile(r"\b(mma\.sync\.aligned\.[\w.]+|wgmma\.mma_async\.[\w.]+)")
_WGMMA_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")
_SASS_MMA = re.compile(r"\b(IMMA\.[\w.]+|HMMA\.[\w.]+|IGMMA\.[\w.]+|HGMMA\.[\w.]+)")


def kernels() -> list[Autotuner | JITFunction]:
    """Every kernel object the modules define (autotuned or bare)."""
    found = []
    for module in MODULES:
        for value in vars(module).values():
            if isinstance(value, (Autotuner, JITFunction)) and value not in found:
                found.append(value)
    return found


def _jit_and_heuristics(kernel) -> tuple[JITFunction, list[Heuristics]]:
    heuristics, fn = [], kernel.fn if isinstance(kernel, Autotuner) else kernel
    while isinstance(fn, Heuristics):
        heuristics.append(fn)
        fn = fn.fn
    return fn, heuristics


def configs_for(kernel, capability: int) -> list[triton.Config]:
    """The configs a launch on this generation tunes over (the int8 GEMM prunes by generation)."""
    if kernel is int8_matmul._int8_matmul_dequant_kernel:
        return int8_matmul.configs_for_capability(capability // 10)
    if isinstance(kernel, Autotuner):
        return list(kernel.configs)
    return [triton.Config({})]


def record_launches() -> list[tuple[object, dict]]:
    """(kernel, keyword arguments) of each launch of a SwitchBack layer's kernels, at 4096 x 4096, bf16."""
    launches = []
    for kernel in kernels():
        kernel.run = lambda *args, _k=kernel, grid, warmup, **kwargs: launches.append((_k, kwargs))
    # The launchers refuse CPU tensors unless interpreting; nothing runs here, so let them through.
    _common.INTERPRET = True
    n = 4096
    x = torch.zeros(n, n, dtype=torch.bfloat16)
    quantize_rowwise.quantize_rowwise(x)
    quantize_rowwise.quantize_rowwise_column_sums(x)
    quantize_tiled.quantize_colwise_transposed(x)
    quantize_tiled.quantize_tensorwise(x, transpose=True)
    quantize_tiled.quantize_tensorwise_and_transpose(x)
    q, scales, tensor_scale = torch.zeros(n, n, dtype=torch.int8), torch.ones(n), torch.ones(())
    dequantize_rowwise.launch_dequantize_rowwise(q, scales, torch.bfloat16)
    # mem-efficient's grad_weight: g.T (bf16, strided) @ int8 x dequantized in the GEMM
    mm_dequant_rows.launch_mm_dequant_rows(torch.zeros(n, n, dtype=torch.bfloat16).t(), q, scales)
    # forward (x @ w.T, row-wise w, bias) and grad_input (g @ w, tensor-wise w): B is K-major in both
    int8_matmul.int8_matmul_dequant(q, q.t(), scales, scales, bias=scales, out_dtype=torch.bfloat16)
    int8_matmul.int8_matmul_dequant(q, q.t(), scales, tensor_scale, out_dtype=torch.bfloat16)
    # StableAdamW's step on bf16 parameters with fp32 state, weight decay on
    params = [torch.zeros(n, n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)]
    state = [torch.zeros(p.shape) for p in params]
    layout = stable_adamw.block_layout(tuple(p.numel() for p in params), torch.device("cpu"))
    stable_adamw.stable_adamw_step(params, params, state, state, [0.1, 0.9, 0.1] * 2, layout,
                                   lr=1e-3, eps=1e-6, weight_decay=0.1, clip_threshold=1.0)
    return launches


def compile_config(kernel, kwargs: dict, config: triton.Config, capability: int) -> dict:
    """Compile one launch with one config for sm_<capability>; ptxas's verdict and the mma it emitted."""
    target = GPUTarget("cuda", capability, WARP_SIZE)
    backend = make_backend(target)
    fn, heuristics = _jit_and_heuristics(kernel)
    # The launcher's own options (enable_fp_fusion) travel with its arguments; split them off.
    args = {k: v for k, v in kwargs.items() if k in fn.arg_names}
    args.update(config.kwargs)
    for heuristic in reversed(heuristics):  # innermost last, as Heuristics.run applies them
        for name, rule in heuristic.values.items():
            args[name] = rule(args)
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(**args, **options)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, parsed)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=parsed.__dict__)
    log = log.getvalue()
    registers = int(_REGS.search(log).group(1))
    spill_stores, spill_loads = (int(v) for v in _SPILLS.search(log).groups())
    ptx = compiled.asm["ptx"]
    sass = _sass(compiled.asm["cubin"]) if _MMA.search(ptx) else ""  # disassemble only the GEMM
    return {
        "kernel": fn.__name__,
        "capability": capability,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "variant": {k: v if isinstance(v, (bool, int, float, str)) else str(v)  # tl.dtype: its name
                    for k, v in kwargs.items() if k.isupper()},
        "registers": registers,
        "blocks_per_sm": blocks_per_sm(capability, registers, compiled.metadata.shared, config.num_warps),
        "spill_stores": spill_stores,
        "spill_loads": spill_loads,
        "shared": compiled.metadata.shared,
        "shared_limit": SHARED_LIMIT[capability],
        "ptx_mma": sorted(set(_MMA.findall(ptx))),
        "wgmma_waits": sorted({int(n) for n in _WGMMA_WAIT.findall(ptx)}),
        "tma": "cp.async.bulk.tensor" in ptx,
        "sass_mma": sorted(set(_SASS_MMA.findall(sass))),
    }


def blocks_per_sm(capability: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp, 8 per thread at a time),
    shared memory and warps: an occupancy model, not a measurement."""
    by_registers = REGISTERS_PER_SM // (-(-registers // 8) * 8 * WARP_SIZE * num_warps)
    by_shared = SHARED_PER_SM[capability] // (shared + 1024)
    return min(by_registers, by_shared, WARPS_PER_SM // num_warps)


def _sass(cubin: bytes) -> str:
    """The cubin disassembled by Triton's bundled cuobjdump ("" if it is missing)."""
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def main(capability: int) -> None:
    seen = set()
    for kernel, kwargs in record_launches():
        for config in configs_for(kernel, capability):
            variant = tuple((k, v) for k, v in kwargs.items() if k.isupper())
            key = (id(kernel), variant, str(config))
            if key in seen:
                continue
            seen.add(key)
            print(json.dumps(compile_config(kernel, kwargs, config, capability)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
