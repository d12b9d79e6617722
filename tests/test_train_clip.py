"""examples/train_clip.py and its helpers: data loading and its errors, short runs per precision,
exact resume, and a two-process torchrun (gloo) run. Small enough for a 2-core CPU (~2-3 minutes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import clip_data  # noqa: E402
import train_clip  # noqa: E402
from llm_int8 import LLMInt8Linear  # noqa: E402

# A run small enough for a test: 2 steps of 8 pairs, a small evaluation.
TINY = [
    "--batch-size",
    "8",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--synthetic-size",
    "64",
    "--zeroshot-samples",
    "30",
    "--val-size",
    "16",
    "--no-progress",
    "--no-tensorboard",
    "--no-plots",
    "--log-every",
    "1",
]
SUMMARY_FIELDS = ("zero_shot_top1", "final_loss", "steps", "precision", "optimizer", "samples_per_s", "spike_events")


def _image(path: Path, color: tuple[int, int, int], size: int = 20) -> Path:
    Image.new("RGB", (size, size), color).save(path)
    return path


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"this is not an image")
    return path


def _transform(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


@pytest.fixture
def image_csv(tmp_path: Path) -> Path:
    """A TSV of 3 readable images and 1 unreadable one (row 1), paths relative to the TSV."""
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", (255, 0, 0))
    _corrupt(tmp_path / "img" / "b.jpg")
    _image(tmp_path / "img" / "c.png", (0, 255, 0))
    _image(tmp_path / "img" / "d.png", (0, 0, 255))
    rows = [
        "filepath\ttitle",
        "img/a.png\ta red square",
        "img/b.jpg\ta broken file",
        "img/c.png\ta green square",
        "img/d.png\ta blue square",
    ]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


# -- data ------------------------------------------------------------------------------------------------


def test_csv_rows_and_unreadable_image_skipped(image_csv: Path):
    ds = clip_data.CsvDataset(image_csv, _transform)
    assert len(ds) == 4
    image, caption, skipped = ds[0]
    assert caption == "a red square" and skipped == 0 and image.shape == (3, 8, 8)
    assert image[0].mean() > 0.99 and image[1:].max() < 0.01
    with pytest.warns(clip_data.UnreadableImageWarning, match="b.jpg"):
        _, caption, skipped = ds[1]
    assert (caption, skipped) == ("a green square", 1)  # the next readable sample takes its place


def test_csv_separator_and_keys(tmp_path: Path):
    _image(tmp_path / "x.png", (10, 20, 30))
    path = tmp_path / "train.csv"
    path.write_text(f'id,image,text\n0,{tmp_path / "x.png"},"a dark, small square"\n')
    ds = clip_data.CsvDataset(path, _transform, img_key="image", caption_key="text", sep=",")
    assert ds[0][1] == "a dark, small square"


def test_csv_errors(tmp_path: Path, image_csv: Path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        clip_data.CsvDataset(tmp_path / "missing.tsv", _transform)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        clip_data.CsvDataset(empty, _transform)
    header_only = tmp_path / "header.tsv"
    header_only.write_text("filepath\ttitle\n")
    with pytest.raises(ValueError, match="no rows"):
        clip_data.CsvDataset(header_only, _transform)
    with pytest.raises(ValueError, match=r"no column 'caption' \(--csv-caption-key\).*\['filepath', 'title'\]"):
        clip_data.CsvDataset(image_csv, _transform, caption_key="caption")
    # A comma file read with the default tab separator: one column, named in the message.
    with pytest.raises(ValueError, match="no column 'filepath'.*--csv-separator"):
        clip_data.CsvDataset(_write(tmp_path / "c.csv", "filepath,title\na.png,x\n"), _transform)
    # The script surfaces the same errors, as a UsageError (one line and exit status 2 from the command line).
    with pytest.raises(train_clip.UsageError, match="no such file"):
        train_clip.main(["--train-data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "run"), *TINY])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    import io

    tar.addfile(info, io.BytesIO(data))


def _png_bytes(color) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_shards(tmp_path: Path):
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    names = list(colors)
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for k in range(2):
                name = names[2 * shard + k]
                key = f"sample{2 * shard + k:04d}"
                _add(tar, f"{key}.png", _png_bytes(colors[name]))
                _add(tar, f"{key}.txt", f"a {name} square".encode())
            if shard == 1:
                _add(tar, "broken.jpg", b"not a jpeg")
                _add(tar, "broken.txt", b"a broken image")
                _add(tar, "orphan.txt", b"a caption without an image")
    assert clip_data.expand_shards(str(tmp_path / "shard-{000..001}.tar")) == [
        str(tmp_path / "shard-000.tar"),
        str(tmp_path / "shard-001.tar"),
    ]
    with pytest.warns(UserWarning, match="1 samples.*lack an image"):
        ds = clip_data.TarShardDataset(str(tmp_path / "shard-{000..001}.tar"), _transform)
    assert len(ds) == 5
    for i, name in enumerate(names):
        image, caption, skipped = ds[i]
        assert caption == f"a {name} square" and skipped == 0
        assert torch.allclose(image[:, 0, 0], torch.tensor(colors[name], dtype=torch.float32) / 255)
    with pytest.warns(clip_data.UnreadableImageWarning, match="broken.jpg"):
        _, caption, skipped = ds[4]
    assert (caption, skipped) == ("a red square", 1)  # wraps to the first sample
    with pytest.raises(FileNotFoundError, match="no such shard"):
        clip_data.TarShardDataset(str(tmp_path / "shard-{000..002}.tar"), _transform)


def test_imagefolder_class_names(tmp_path: Path):
    for folder, color in (("tabby_cat", (200, 100, 0)), ("golden_retriever", (220, 180, 60))):
        (tmp_path / folder).mkdir()
        _image(tmp_path / folder / "1.png", color)
    _corrupt(tmp_path / "tabby_cat" / "2.jpg")
    ds = clip_data.ImageFolderClasses(tmp_path, _transform)
    assert ds.classnames == ["golden retriever", "tabby cat"]
    with pytest.warns(clip_data.UnreadableImageWarning):
        items = [ds[i] for i in range(len(ds))]
    images, labels, dropped = clip_data.collate_eval(items)
    assert labels.tolist() == [0, 1] and dropped == 1 and images.shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError):
        clip_data.ImageFolderClasses(tmp_path / "nope", _transform)


def test_synthetic_is_deterministic_and_holds_classes_out():
    train = clip_data.SyntheticShapes(100, 32, split="train")
    a, caption_a, _ = train[7]
    b, caption_b, _ = clip_data.SyntheticShapes(100, 32, split="train")[7]
    assert torch.equal(a, b) and caption_a == caption_b
    heldout = {train.classnames[k] for k in train.heldout}
    assert len(heldout) == 6
    for i in range(300):
        attrs, caption = train.describe(i)
        assert f"{attrs['color']} {attrs['shape']}" not in heldout and attrs["color"] in caption
    zeroshot = clip_data.SyntheticShapes(60, 32, split="zeroshot")
    assert sorted(zeroshot[i][1] for i in range(60)) == sorted(list(range(30)) * 2)


def test_step_batch_sampler_resumes_and_shards():
    full = clip_data.StepBatchSampler(10, 3, seed=1, steps=8, world_size=2, rank=0)
    other = clip_data.StepBatchSampler(10, 3, seed=1, steps=8, world_size=2, rank=1)
    resumed = clip_data.StepBatchSampler(10, 3, seed=1, steps=8, start_step=5, world_size=2, rank=0)
    assert list(full)[5:] == list(resumed)
    step0 = full.indices(0) + other.indices(0)
    assert len(set(step0)) == 6  # ranks read disjoint parts of one global batch
    seen = [i for s in range(5) for i in full.indices(s) + other.indices(s)][:30]
    assert sorted(seen) == sorted(list(range(10)) * 3)  # three epochs, each a permutation


def test_llm_int8_linear_quantizes_all_three_matmuls():
    torch.manual_seed(0)
    reference = torch.nn.Linear(48, 24)
    layer = LLMInt8Linear.from_linear(torch.nn.Linear(48, 24))
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
        layer.bias.copy_(reference.bias)
    x = torch.randn(5, 7, 48)
    x_ref, x_q = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference(x_ref).square().sum().backward()
    layer(x_q).square().sum().backward()

    def sqnr(ref, test):
        return 20 * torch.log10(ref.norm() / (ref - test).norm())

    for ref, test in ((x_ref.grad, x_q.grad), (reference.weight.grad, layer.weight.grad)):
        assert 25 < sqnr(ref, test) < 80  # close, but quantized (not the exact fp32 value)
    assert torch.allclose(reference.bias.grad, layer.bias.grad, rtol=1e-2, atol=1e-2)


# -- runs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", train_clip.PRECISIONS)
def test_short_run_writes_summary(tmp_path: Path, precision: str):
    out = tmp_path / "run"
    summary = train_clip.main(["--precision", precision, "--out", str(out), *TINY])
    written = json.loads((out / "summary.json").read_text())
    for field in SUMMARY_FIELDS:
        assert field in written, field
    assert written["precision"] == precision and written["steps"] == 2
    assert 0 <= written["zero_shot_top1"] <= 1 and np.isfinite(written["final_loss"])
    assert written["samples_per_s"] > 0 and isinstance(written["spike_events"], list)
    assert summary["final_loss"] == written["final_loss"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_run_on_files_with_adamw_layer_scale_and_plots(tmp_path: Path, image_csv: Path, capsys):
    zeroshot = tmp_path / "zs"
    for name, color in (("red_thing", (255, 0, 0)), ("green_thing", (0, 255, 0))):
        (zeroshot / name).mkdir(parents=True)
        _image(zeroshot / name / "0.png", color)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", clip_data.UnreadableImageWarning)
        summary = train_clip.main(
            [
                "--train-data",
                str(image_csv),
                "--val-data",
                str(image_csv),
                "--zeroshot-dir",
                str(zeroshot),
                "--optimizer",
                "adamw",
                "--ls-init",
                "--grad-clip",
                "1.0",
                "--out",
                str(tmp_path / "run"),
                *[a for a in TINY if a != "--no-plots"],
                "--batch-size",
                "4",
            ]
        )
    assert summary["zero_shot_classes"] == 2 and summary["zero_shot_images"] == 2
    # Which set and templates: the default photo ones, with how to pass templates that match the captions.
    assert summary["zero_shot_set"] == str(zeroshot)
    assert summary["zero_shot_templates"] == list(train_clip.clip_eval.DEFAULT_TEMPLATES)
    printed = capsys.readouterr().out
    assert f"zero-shot: 2 classes, 2 images from {zeroshot}; templates ['a photo of a {{}}.'" in printed
    assert "the default photo templates" in printed and "--zeroshot-templates" in printed
    assert summary["skipped_images"] >= 1  # the broken row of the CSV
    assert summary["retrieval"]["pairs"] == 4
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "spikes.png").exists()


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_is_exact(tmp_path: Path):
    args = [*TINY, "--steps", "6", "--save-every", "3", "--precision", "switchback", "--monitor-action", "skip"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_clip.main([*args, "--out", str(straight), "--keep-checkpoints"])
    # As if killed after step 4: the run directory holds the step-3 checkpoint and logs up to step 4.
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-000003.pt", resumed / "checkpoint.pt")
    for name in ("log.jsonl", "monitor.jsonl"):
        (resumed / name).write_text("".join((straight / name).read_text().splitlines(True)[:4]))
    train_clip.main([*args, "--out", str(resumed), "--resume", "auto"])
    assert _losses(resumed) == _losses(straight)  # bit for bit, steps 1-6 (4-6 recomputed)
    # The monitor continues its own file: step 4's line is written once, RMS values bit for bit.
    monitor_lines = (resumed / "monitor.jsonl").read_text()
    assert monitor_lines == (straight / "monitor.jsonl").read_text()
    assert [json.loads(line)["step"] for line in monitor_lines.splitlines()] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in resumed.glob("monitor*")) == ["monitor.jsonl"]
    assert not list(resumed.glob(".*tmp*"))  # atomic writes leave no temporary files
    checkpoint = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "config", "step", "rng", "monitor"} <= set(checkpoint)
    assert checkpoint["monitor"]["step_count"] == 6
    assert set(checkpoint["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    with pytest.raises(ValueError, match="batch_size"):
        train_clip.main([*args, "--batch-size", "4", "--out", str(resumed), "--resume", "auto"])


def test_resume_logs_every_step_to_tensorboard_once(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [*(a for a in TINY if a != "--no-tensorboard"), "--steps", "4", "--save-every", "2", "--out", str(out)]
    train_clip.main([*args, "--keep-checkpoints"])
    # As if killed after step 4 with the step-2 checkpoint the latest: steps 3-4 run and log again.
    shutil.copy(out / "checkpoint-000002.pt", out / "checkpoint.pt")
    train_clip.main([*args, "--resume", "auto"])
    for folder, tag in ((out / "tb", "train/loss"), (out / "tb" / "monitor", "loss")):
        events = EventAccumulator(str(folder))
        events.Reload()
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4], folder


def _record_fsync_and_replace(monkeypatch, out: Path) -> list[tuple]:
    """Records ("fsync", names of the files in `out` it synced) and ("replace", src name, dst name)."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        inode = os.fstat(fd).st_ino
        calls.append(("fsync", *(p.name for p in out.iterdir() if p.stat().st_ino == inode)))
        fsync(fd)

    def recording_replace(src, dst) -> None:
        replace(src, dst)
        calls.append(("replace", Path(src).name, Path(dst).name))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls


def test_resume_rewrites_log_atomically(tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, "--steps", "4", "--save-every", "2", "--out", str(out)]
    train_clip.main([*args, "--keep-checkpoints"])
    shutil.copy(out / "checkpoint-000002.pt", out / "checkpoint.pt")
    straight, straight_losses = (out / "log.jsonl").read_text().splitlines(), _losses(out)
    calls = _record_fsync_and_replace(monkeypatch, out)
    train_clip.main([*args, "--resume", "auto"])
    # log.jsonl: the checkpoint's lines to a synced temporary file beside it, then os.replace.
    tmp = f".log.jsonl.tmp{os.getpid()}"
    i = calls.index(("replace", tmp, "log.jsonl"))
    assert calls[i - 1] == ("fsync", tmp)
    assert (out / "log.jsonl").read_text().splitlines()[:2] == straight[:2]  # the checkpoint's lines
    assert _losses(out) == straight_losses
    assert not list(out.glob(".*tmp*"))


def test_monitor_jsonl_is_synced_before_each_checkpoint(tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    calls = _record_fsync_and_replace(monkeypatch, out)
    out.mkdir()
    train_clip.main([*TINY, "--steps", "4", "--save-every", "2", "--out", str(out)])
    sync, save = ("fsync", "monitor.jsonl"), ("replace", f".checkpoint.pt.tmp{os.getpid()}", "checkpoint.pt")
    assert [c for c in calls if c in (sync, save)] == [sync, save] * 2  # saved at steps 2 and 4


def test_resume_refuses_changed_settings(tmp_path: Path):
    out = tmp_path / "run"
    args = [*TINY, "--monitor-action", "skip", "--out", str(out)]
    train_clip.main(args)
    changes = {
        "optimizer": (["--optimizer", "adamw"], "'stableadamw' -> 'adamw'"),
        "monitor_action": (["--monitor-action", "rollback"], "'skip' -> 'rollback'"),
        "monitor": (["--no-monitor"], "True -> False"),  # a monitor that skips steps changes the run
        "grad_clip": (["--grad-clip", "1"], "0.0 -> 1.0"),
        "data_seed": (["--data-seed", "1"], "0 -> 1"),
        "synthetic_size": (["--synthetic-size", "32"], "64 -> 32"),
        "amp": (["--amp", "bf16"], "'auto' -> 'bf16'"),
        "augment": (["--augment"], "False -> True"),
        "ls_init": (["--ls-init"], "False -> True"),
        "swap_all": (["--swap-all"], "False -> True"),
        "lr": (["--lr", "1e-3"], "0.002 -> 0.001"),  # the checkpoint's optimizer state would override these
        "wd": (["--wd", "0"], "0.1 -> 0.0"),
        "beta2": (["--beta2", "0.95"], "0.98 -> 0.95"),
    }
    for key, (flags, values) in changes.items():
        with pytest.raises(ValueError, match=rf"\b{key} {re.escape(values)}"):
            train_clip.main([*args, *flags, "--resume", "auto"])
    with pytest.raises(ValueError, match=r"optimizer 'stableadamw' -> 'adamw', grad_clip 0.0 -> 1.0"):
        train_clip.main([*args, "--optimizer", "adamw", "--grad-clip", "1", "--resume", "auto"])
    # Output, logging, evaluation and checkpoint flags may change.
    allowed = ["--log-every", "5", "--save-every", "7", "--eval-every", "3", "--zeroshot-samples", "60"]
    assert train_clip.main([*args, *allowed, "--resume", "auto"])["steps"] == 2


def test_torchrun_two_processes_match_one(tmp_path: Path):
    """2 gloo processes x 4 pairs train as 1 process x 8 pairs: one global contrastive batch."""
    args = [*TINY, "--batch-size", "4", "--steps", "3", "--precision", "switchback"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLES / "train_clip.py"),
        *args,
        "--out",
        str(tmp_path / "ddp"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    train_clip.main([*args, "--batch-size", "8", "--out", str(tmp_path / "single")])
    np.testing.assert_allclose(_losses(tmp_path / "ddp"), _losses(tmp_path / "single"), rtol=2e-3)
