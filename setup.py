"""lowbit: low-bit (int8 / float8) training for CLIP and ViT models.

`kernels/` sits beside `lowbit/` in the repository but installs as `lowbit.kernels`,
so there is one import root and no clash with other packages named `kernels`.
"""

from setuptools import setup

CLIP = ["open_clip_torch>=2.24", "timm>=0.9"]
# Peers the benchmarks compare against; any that is missing is reported as skipped.
BENCH = ["bitsandbytes>=0.43", "torchao>=0.7", "torch-optimi>=0.2", "pytorch_optimizer>=3.0", "matplotlib>=3.7"]
# expecttest: torch.testing._internal (module_db, in tests/test_module_db.py) imports it.
DEV = CLIP + BENCH + ["pytest>=7", "tensorboard>=2.14", "ruff>=0.4", "transformers>=4.40", "expecttest"]

setup(
    name="lowbit",
    version="0.1.0",
    description="SwitchBack int8 and float8 linear layers, StableAdamW and a loss-spike monitor "
    "for low-precision CLIP/ViT training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "lowbit", "lowbit.int8", "lowbit.float8", "lowbit.nn", "lowbit.adapters", "lowbit.optim", "lowbit.monitor",
        "lowbit.kernels",
    ],
    package_dir={"lowbit": "lowbit", "lowbit.kernels": "kernels"},
    install_requires=[
        "torch>=2.14",  # the oldest tested green; 2.4-2.8 fail the layer and kernel tests (see .ci/run)
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={"clip": CLIP, "bench": BENCH, "dev": DEV},
    license="MIT",
)
