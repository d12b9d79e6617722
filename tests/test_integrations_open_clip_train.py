"""`python -m lowbit.open_clip_train`: open_clip's own training script on a tiny CSV of generated
images with a tiny model (local-dir: config), swapped to SwitchBack, StableAdamW, the SpikeMonitor,
and --resume of its checkpoint. Runs in subprocesses, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train.main")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_run(tmp_path: Path) -> dict:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL}))
    images = tmp_path / "images"
    images.mkdir()
    rows = ["filepath\ttitle"]
    for i in range(8):
        path = images / f"{i}.png"
        Image.new("RGB", (40, 40), (30 * i, 255 - 30 * i, 100)).save(path)
        rows.append(f"{path}\ta picture of colour {i}")
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return {"model": f"local-dir:{model_dir}", "csv": csv, "logs": tmp_path / "logs"}


def _args(run: dict, epochs: int, *extra: str) -> list[str]:
    return [
        "--model", run["model"], "--train-data", str(run["csv"]), "--dataset-type", "csv",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "2",
        "--epochs", str(epochs), "--workers", "0", "--lr", "1e-3", "--wd", "0.1", "--warmup", "1",
        "--logs", str(run["logs"]), "--name", "tiny", "--seed", "0", "--log-every-n-steps", "1",
        "--report-to", "", "--save-frequency", "1", "--precision", "fp32", *extra,
    ]  # fmt: skip


LOWBIT = [
    "--lowbit-precision", "switchback", "--lowbit-filter", "all", "--lowbit-optimizer", "stableadamw",
    "--lowbit-monitor",
]  # fmt: skip


def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lowbit.open_clip_train", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _jsonl(run: dict) -> list[dict]:
    lines = (run["logs"] / "tiny" / "lowbit_monitor.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_open_clip_train_swaps_uses_stableadamw_monitors_and_resumes(tiny_run: dict) -> None:
    _run(_args(tiny_run, 1, *LOWBIT))
    log_dir = tiny_run["logs"] / "tiny"
    log = (log_dir / "out.log").read_text()
    # The swap ran, before the model was printed and trained: open_clip's own log shows lowbit layers.
    assert "lowbit: swapping to 'switchback'" in log
    assert "SwitchBackLinear" in log
    # 1 + 1 attention blocks, 2 + 2 MLP linears, and the two towers' projections are parameters, not layers.
    assert "lowbit: 6 of 6 nn.Linear / nn.MultiheadAttention layers are lowbit layers" in log
    assert "lowbit: 100.0 % of linear FLOPs run in low precision" in log, log[-3000:]
    assert "Created StableAdamW (adamw) optimizer" in log  # open_clip's own line names the class it got
    assert "lowbit: StableAdamW(lr=0.001" in log and "weight_decay per group=[0.0, 0.1]" in log

    checkpoint = torch.load(log_dir / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert any(".weight" in k for k in checkpoint["state_dict"])
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["clip_threshold"] for g in groups] == [1.0, 1.0]  # a StableAdamW group
    monitor_state = checkpoint["optimizer"]["lowbit_monitor"]
    assert monitor_state["step_count"] == 4  # 8 images, batch 2

    records = _jsonl(tiny_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["rms"] and any(v is not None for v in r["rms"].values()) for r in records)
    assert any("attn" in name for name in records[0]["rms"])
    assert (log_dir / "lowbit_spikes.png").stat().st_size > 0

    # --resume: epoch 2 continues the monitor's count and its JSONL.
    _run(_args(tiny_run, 2, *LOWBIT, "--resume", "latest"))
    log = (log_dir / "out.log").read_text()
    assert "holds SpikeMonitor state at step 4" in log and "resumed at step 4" in log
    assert [r["step"] for r in _jsonl(tiny_run)] == list(range(1, 9))
    checkpoint = torch.load(log_dir / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert checkpoint["optimizer"]["lowbit_monitor"]["step_count"] == 8
    assert checkpoint["optimizer"]["lowbit_monitor"]["history"]["steps"].tolist() == list(range(1, 9))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lowbit-precision", "switchback", "--torchscript"], "--torchscript"),
        (["--lowbit-precision", "switchback", "--use-bnb-linear", "SwitchBackLinearGlobal"], "--use-bnb-linear"),
        (["--lowbit-optimizer", "stableadamw", "--opt", "timm/sgd"], "--opt timm/sgd"),
        # A lowbit flag that would do nothing without the one it modifies is refused, not ignored.
        (["--lowbit-clip-threshold", "2.0"], "--lowbit-clip-threshold needs --lowbit-optimizer"),
        (["--lowbit-monitor-action", "skip"], "--lowbit-monitor-action needs --lowbit-monitor"),
        (["--lowbit-filter", "all", "--lowbit-monitor"], "--lowbit-filter needs --lowbit-precision"),
    ],
)
def test_incompatible_flags_are_refused(tiny_run: dict, flags: list[str], message: str, capsys) -> None:
    from lowbit.integrations.open_clip_train import main

    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_run, 1, *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tiny_run["logs"] / "tiny").exists()  # refused before open_clip started
