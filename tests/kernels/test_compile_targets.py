"""Every autotune config of every Triton kernel compiles for sm_80 and sm_90, on the CPU.

Triton's bundled ptxas builds the cubins (no GPU needed); tests/kernels/compile_targets.py does the
compiling in its own processes (real kernels need TRITON_INTERPRET unset) and reports ptxas's register
and spill counts, the shared memory and the mma instructions of each config. Checked here: no register
spills (a spilling config is slow whatever autotuning picks), shared memory within the generation's
per-block limit (a config over it fails to launch), and int8 tensor-core instructions in the int8 GEMM.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

CAPABILITIES = (80, 90)
REPO = Path(__file__).resolve().parents[2]


def _ptxas_path() -> str | None:
    try:
        return triton.knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 (no NVIDIA backend or no bundled ptxas: the test skips)
        return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, list[dict]]:
    """{capability: one record per (kernel, variant, config)}, both generations compiled in parallel."""
    ptxas = _ptxas_path()
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas was not found (triton.knobs.nvidia.ptxas.path)")
    procs = {}
    for cap in CAPABILITIES:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # A cache of this run only: a stale kernel from an earlier checkout must not stand in for this one.
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"triton-cache-sm{cap}"))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        procs[cap] = subprocess.Popen(
            [sys.executable, "-m", "tests.kernels.compile_targets", str(cap)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    results = {}
    for cap, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"compiling for sm_{cap} failed:\n{err[-4000:]}"
        results[cap] = [json.loads(line) for line in out.splitlines()]
    return results


def _name(r: dict) -> str:
    return f"sm_{r['capability']} {r['kernel']} {r['variant']} {r['config']}"


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_every_kernel_and_config_compiled(compiled, cap):
    kernels = {r["kernel"] for r in compiled[cap]}
    assert kernels == {
        "_int8_matmul_dequant_kernel",
        "_quantize_rowwise_body",
        "_dequantize_rowwise_kernel",
        "_mm_dequant_rows_kernel",
        "_moments_kernel",
        "_sums_kernel",
        "_update_kernel",
        "_tiled_absmax_kernel",
        "_quantize_tiled_body",
    }
    # the row-wise kernel with and without grad_bias's column sums
    assert {r["variant"]["COLUMN_SUMS"] for r in compiled[cap] if r["kernel"] == "_quantize_rowwise_body"} == {
        True, False}
    # the tiled pair runs at both granularities: per column (transposed) and per tensor
    tiled = {(r["kernel"], r["variant"]["PER_COLUMN"]) for r in compiled[cap] if "tiled" in r["kernel"]}
    assert tiled == {(k, g) for k in ("_tiled_absmax_kernel", "_quantize_tiled_body") for g in (True, False)}
    assert any(r["variant"].get("BOTH") for r in compiled[cap])  # q(w) and q(w)^T in one pass
    gemm = [r for r in compiled[cap] if r["kernel"] == "_int8_matmul_dequant_kernel"]
    configs = importlib.import_module("lowbit.kernels.int8_matmul").configs_for_capability(cap // 10)
    assert len(gemm) == 2 * len(configs)  # two variants (forward, grad_input) x this generation's configs


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_no_register_spills(compiled, cap):
    spilling = [f"{_name(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded, {r['registers']} regs"
                for r in compiled[cap] if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(spilling)


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_shared_memory_within_limit(compiled, cap):
    over = [f"{_name(r)}: {r['shared']} B > {r['shared_limit']} B"
            for r in compiled[cap] if r["shared"] > r["shared_limit"]]
    assert not over, "\n".join(over)


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_int8_gemm_uses_int8_tensor_cores(compiled, cap):
    # sm_80: mma.sync m16n8k32 s8 -> IMMA; sm_90: wgmma s8 -> IGMMA (an fp fallback would be HMMA/HGMMA)
    ptx_op, sass_op = ("mma.sync.aligned.m16n8k32", "IMMA.") if cap == 80 else ("wgmma.mma_async", "IGMMA.")
    for r in compiled[cap]:
        if r["kernel"] != "_int8_matmul_dequant_kernel":
            continue
        assert r["ptx_mma"] and all(op.startswith(ptx_op) and ".s8.s8" in op for op in r["ptx_mma"]), _name(r)
        assert r["sass_mma"] and all(op.startswith(sass_op) and "S8.S8" in op for op in r["sass_mma"]), _name(r)
