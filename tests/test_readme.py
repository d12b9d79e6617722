"""The README's Python examples run as written (with the few names they leave to the reader defined
here), and the coverage report it prints shows the FLOP counts the code gives."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowbit

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_the_examples_this_file_runs():
    # A new example needs a decision here: run it below, or say why it cannot run in a test.
    assert len(BLOCKS) == 6, "README python examples changed: update tests/test_readme.py"


def _clip_loss(model, images, texts):
    image_features, text_features, scale = model(images, texts)
    logits = scale * image_features @ text_features.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_the_clip_swap_optimizer_and_monitor_examples_run_in_order(tmp_path, monkeypatch):
    """Blocks 1, 3, 4 and 5: swap ViT-B-32, StableAdamW, the SpikeMonitor loop, QuantHealth."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # the monitor example writes run/
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    texts = open_clip.tokenize(["a photo of a cat", "a photo of a dog"])
    namespace = {"images": images, "texts": texts, "loader": [(images, texts)], "step_loss": _clip_loss}
    for index in (0, 2, 3, 4):
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model.visual.transformer.resblocks[0].mlp.c_fc, lowbit.SwitchBackLinear)
    assert isinstance(namespace["optimizer"], lowbit.StableAdamW)
    assert (tmp_path / "run" / "monitor.jsonl").stat().st_size > 0
    assert (tmp_path / "run" / "spikes.png").stat().st_size > 0


def test_the_coverage_example_prints_the_readme_s_flop_counts(capsys):
    timm = pytest.importorskip("timm")
    exec(compile(BLOCKS[1], "README.md python block 2", "exec"), {"timm": timm, "torch": torch, "lowbit": lowbit})
    printed = capsys.readouterr().out.splitlines()
    after = README.split(BLOCKS[1], 1)[1]
    shown = re.match(r"```\n```\n(.*?)```", after, flags=re.S).group(1).splitlines()  # its output block
    assert printed[0] == shown[0]
    assert printed[1].split() == shown[1].split()  # the column header


def test_the_trainer_example_names_what_lowbit_provides():
    """Block 6 needs a Hugging Face model and dataset (tests/test_integrations_transformers.py trains
    one); here: it parses, and the lowbit names it uses exist."""
    compile(BLOCKS[5], "README.md python block 6", "exec")
    from lowbit.integrations.transformers import add_spike_monitor  # noqa: F401

    assert callable(lowbit.ALL) and "switchback" in lowbit.layer_names()
