#!/usr/bin/env bash
# Everything a short GPU lease should do, in one call (the device tool's `run`, about 15 minutes of
# device time per session): install, the GPU tests, the kernel tests on CUDA, the gpu-quick
# benchmarks, one tarball back; each step time-limited so the whole stays under 9 minutes.
#
#   run(command="LOWBIT_COMMIT=<hash> bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
#
# .whl/ (git-ignored) may hold wheels the GPU image lacks: expecttest (torch's module tests import it),
# open_clip_torch + ftfy + wcwidth (the ViT-B-32 step), torchao (a peer); see benchmarks/README.md.
# The image's torch / Triton (2.11 / 3.6 when last seen) are setup.py's floor; versions.txt records them.
# Each step has its own time limit so a hang cannot eat the lease; the results so far are
# packed whatever fails. Back here: untar into benchmarks/results/ and commit with the device named.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lowbit-gpu-session-out}
work=$(mktemp -d)/gpu-session
mkdir -p "$out" "$work"
start=$SECONDS
step() { echo "== $1 ($((SECONDS - start)) s)" | tee -a "$work/steps.log"; }

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3

step "versions"
{
    echo "commit: ${LOWBIT_COMMIT:-unknown}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 - <<'PY'
import importlib.metadata as md
import torch
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("torch", "triton", "lowbit", "timm", "open_clip_torch", "torchao", "bitsandbytes"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PY
} > "$work/versions.txt" 2>&1
cat "$work/versions.txt"

step "pytest -m gpu"
# A test module whose imports fail (a wheel not carried) must not stop the others' GPU tests.
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors 2>&1 \
    | tee "$work/pytest-gpu.log" | tail -15

step "kernel and fast-path tests on CUDA"
# On a GPU these run the compiled kernels against their torch twins (on the CPU: the interpreter).
timeout 150 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/kernels \
    tests/test_grad_bias_fused.py tests/test_backward_fast_path.py tests/test_optim_triton.py tests/test_mx_real.py \
    2>&1 | tee "$work/pytest-kernels.log" | tail -15

step "benchmarks --preset gpu-quick"
timeout 240 python3 benchmarks/run_all.py --preset gpu-quick --out "$work/bench" --quiet 2>&1 \
    | tee "$work/bench.log" | tail -25

step "pack"
tar czf "$out/gpu-session.tgz" -C "$(dirname "$work")" gpu-session
cp "$work/steps.log" "$work/versions.txt" "$out/" 2>/dev/null
cp "$work/bench/report.md" "$out/" 2>/dev/null
echo "== done in $((SECONDS - start)) s: $out/gpu-session.tgz"
