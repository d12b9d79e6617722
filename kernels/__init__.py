"""Triton kernels behind lowbit.int8.ops: int8 quantization (row, column, tensor) and the int8 GEMM.

Each launcher matches the torch twin of the same name in `lowbit.int8.ops` bit for bit on the int8 values.
On CPU tensors they run under Triton's interpreter (TRITON_INTERPRET=1, set before importing triton).

This folder is the package `lowbit.kernels`. Imported as a top-level `kernels` (the repository
root is on sys.path, e.g. `python -m pytest` from it), it steps aside: the import resolves to
another package named `kernels` if one is installed (bitsandbytes and transformers look for Hugging
Face's), and otherwise to this empty module, with no version and no attributes, which both read as
"not installed" (an ImportError here would escape transformers' availability check).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)  # what `import kernels` returns
        _spec.loader.exec_module(sys.modules["kernels"])
    del _root, _elsewhere, _spec, importlib, os, sys
else:
    from lowbit.kernels._api import *  # noqa: F403
    from lowbit.kernels._api import __all__  # noqa: F401
