"""lowbit: low-bit (int8 / float8) training for CLIP and ViT models.

`kernels/` sits beside `lowbit/` in the repository but installs as `lowbit.kernels`,
so there is one import root and no clash with other packages named `kernels`.
"""

from setuptools import find_packages, setup

# open_clip_train (python -m lowbit.open_clip_train) imports braceexpand, webdataset and pandas at the top
# of its data module; fsspec comes with huggingface-hub, which open_clip_torch requires.
CLIP = ["open_clip_torch>=2.24", "timm>=0.9", "braceexpand", "webdataset", "pandas"]
# lowbit.integrations.transformers (tested with transformers 5.24 only); the Trainer needs accelerate.
HF = ["transformers>=4.45", "accelerate>=0.26"]
# Peers the benchmarks compare against; any that is missing is reported as skipped.
BENCH = ["bitsandbytes>=0.43", "torchao>=0.7", "torch-optimi>=0.2", "pytorch_optimizer>=3.0", "matplotlib>=3.7"]
# expecttest: torch.testing._internal (PyTorch's module_db, tests/test_module_db.py) imports it.
DEV = CLIP + BENCH + HF + ["pytest>=7", "tensorboard>=2.14", "ruff>=0.4", "expecttest"]

setup(
    name="lowbit",
    version="0.1.0",
    description="SwitchBack int8 and float8 linear layers, StableAdamW and a loss-spike monitor "
    "for low-precision CLIP/ViT training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Found, not listed: a hand-written list had missed lowbit.mx (tests/test_packaging.py).
    packages=["lowbit", "lowbit.kernels"] + [f"lowbit.{name}" for name in find_packages("lowbit")],
    package_dir={"lowbit": "lowbit", "lowbit.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",  # the oldest tested green (the GPU image's); 2.4-2.8 fail the tests (see .ci/run)
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={"clip": CLIP, "bench": BENCH, "hf": HF, "dev": DEV},
    license="MIT",
)
