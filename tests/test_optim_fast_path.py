"""StableAdamW's foreach step stays on PyTorch's multi-tensor fast path.

A `_foreach_*` op runs as a few multi-tensor kernels only when its tensor lists pair tensors of the
same shape; a list of 0-dim step sizes against full-size tensors makes it run one kernel per tensor
(~1,100 launches per step for ViT-H). Recorded here with a TorchDispatchMode on the CPU: the ops of
a step, which must pair same-shaped tensors and must not grow with the number of parameters.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.optim import StableAdamW

# No kernel behind these: views, allocations, and reading the CPU step counters.
_NO_LAUNCH = {"empty_like", "empty_strided", "empty", "_local_scalar_dense"}


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _launching(calls):
    return [(f, a) for f, a in calls if not f.is_view and f._schema.name.split("::")[-1] not in _NO_LAUNCH]


def _record_step(n_params, dtype):
    shapes = [(13, 7), (5,), (3, 4, 2)]
    params = [torch.randn(shapes[i % 3], dtype=dtype, requires_grad=True) for i in range(n_params)]
    opt = StableAdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the state
    with _Record() as rec:
        opt.step()
    return _launching(rec.calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ops_per_step_do_not_grow_with_the_parameter_count(dtype):
    few, many = _record_step(3, dtype), _record_step(12, dtype)
    assert [str(f) for f, _ in few] == [str(f) for f, _ in many]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_ops_pair_same_shaped_tensors(dtype):
    for func, args in _record_step(6, dtype):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if not str(func).startswith("aten._foreach_") or len(lists) < 2:
            continue
        for i, tensors in enumerate(zip(*lists)):
            assert len({t.shape for t in tensors}) == 1, f"{func}, tensor {i}: {[t.shape for t in tensors]}"
