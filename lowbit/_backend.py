"""Which implementation runs an op, for every format: the fast kernels or the plain-torch reference.

`LOWBIT_BACKEND=auto|triton|torch` sets the default; `use_backend(...)` overrides it for a block.
  auto:   int8: Triton for CUDA tensors, torch elsewhere. float8: torch._scaled_mm on GPUs with
          fp8 tensor cores, the simulation elsewhere.
  triton: int8: Triton always (CPU tensors then need TRITON_INTERPRET=1: how CI tests the kernels).
          float8: as auto.
  torch:  the plain-torch reference always (int8's torch twins, float8's simulation), except for a
          Float8Linear built with simulate=False, which asked for real fp8 by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

# The one module global the style guide allows: a `use_backend` override of the environment.
_override: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown lowbit backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend asked for: the `use_backend` override, else $LOWBIT_BACKEND, else "auto"."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get("LOWBIT_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on `name` ("auto", "triton" or "torch")."""
    global _override
    previous, _override = _override, _check_name(name)
    try:
        yield
    finally:
        _override = previous


# Looked up once: torch 2.11's dynamo refuses to trace importlib.util.find_spec (a graph break, an error
# under fullgraph=True) and 2.14's does not; whether triton is installed does not change in a process.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_can_run(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on `x` here: a CUDA tensor, or any under the interpreter."""
    return triton_available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on `x` should launch a Triton kernel, raising if Triton was forced but can't run."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("LOWBIT_BACKEND=triton but triton is not installed: `pip install triton` (Linux).")
    if not triton_can_run(x):
        raise RuntimeError(
            "LOWBIT_BACKEND=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, or use LOWBIT_BACKEND=auto."
        )
    return True
