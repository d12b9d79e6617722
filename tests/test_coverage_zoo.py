"""Coverage on the zoo layouts the sweep found: after swapping every layer, at least 99% of each
model's linear-like FLOPs run in int8, outputs stay close to the float model's, state_dict keys
are unchanged and unswap restores every module's class and the float outputs."""

import copy
import warnings

import pytest
import torch

import lowbit
from tests.zoo.models import ZOO, outputs

pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("transformers")

# nn.MultiheadAttention with kdim != embed_dim is not wrapped yet (lowbit/nn/attention.py's can_wrap):
# CoCa's attentional pooler is the one such layer in the zoo.


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_runs_in_low_precision(name):
    make, inputs = ZOO[name]
    torch.manual_seed(0)
    model = make().eval()
    example = inputs()
    with torch.no_grad():
        reference = outputs(model(*example))
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    assert lowbit.coverage(model, *example).low_precision_fraction == 0.0

    lowbit.swap(model, filter_fn=lowbit.ALL)
    assert list(model.state_dict()) == keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every swapped layer runs its own forward: no warning
        report = lowbit.coverage(model, *example, backward=True)
    fraction = report.low_precision_fraction  # CoCa's attention pool (kdim != embed_dim) included
    assert fraction >= 0.99, str(report)
    measured = [layer.sqnr_db for layer in report.layers if layer.sqnr_db is not None]
    assert measured and min(measured) >= 30, str(report)  # the default (row-wise) recipe
    with torch.no_grad():
        swapped = outputs(model(*example))
    worst = min(cosine(a, b) for a, b in zip(reference, swapped))
    print(f"{name}: low_precision_fraction {fraction:.4f}, cosine {worst:.5f}, min SQNR {min(measured):.1f} dB")
    assert worst >= 0.995

    lowbit.unswap(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(k.startswith("_lowbit") for m in model.modules() for k in m.__dict__)
    with torch.no_grad():
        for a, b in zip(reference, outputs(model(*example))):
            torch.testing.assert_close(a, b)


def test_state_dict_loads_across(tmp_path):
    """A swapped model's checkpoint loads into the float model and back (GPT-2's Conv1D, RN50's pool)."""
    for name in ("GPT2LMHeadModel", "RN50"):
        make, _ = ZOO[name]
        torch.manual_seed(0)
        float_model = make()
        swapped = lowbit.swap(copy.deepcopy(float_model), filter_fn=lambda m, n: True)
        with torch.no_grad():
            for p in swapped.parameters():
                p.add_(0.01)
        float_model.load_state_dict(swapped.state_dict())
        for a, b in zip(float_model.state_dict().values(), swapped.state_dict().values()):
            assert torch.equal(a, b)
