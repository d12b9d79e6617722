"""examples/train_clip.py never loses a run: every flag, path and input checked before the first step,
one clear line for each mistake, no overwrites, checkpoint errors that say what to do, clean saves.

One test (or group) per row of issue 15's table. CPU, tiny runs: the checks that fail fast run no step.
"""

from __future__ import annotations

import errno
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_clip import TINY, _image, train_clip


def _run(out: Path, *extra: str) -> dict:
    return train_clip.main([*TINY, "--out", str(out), *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run that kept checkpoint-000001.pt and checkpoint-000002.pt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _run(out, "--save-every", "1", "--keep-checkpoints")
    return out


def _csv(folder: Path, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(rows):
        _image(folder / f"{i}.png", (80 * i % 256, 40, 200))
        lines.append(f"{i}.png\ta picture number {i}")
    path = folder / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- a new run into a folder that holds one ------------------------------------------------------------


def test_existing_run_is_refused_untouched_and_replaced_only_with_overwrite(finished_run: Path, tmp_path: Path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    refused = r"already holds a run \(checkpoint.pt, .*--resume auto.*--overwrite"
    with pytest.raises(train_clip.UsageError, match=refused):
        _run(out)
    assert _snapshot(out) == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    _run(out, "--overwrite", "--steps", "1")
    assert not list(out.glob("checkpoint-*.pt"))  # the old run's numbered checkpoints went with it
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: kept
    with pytest.raises(train_clip.UsageError, match="pass one of them"):
        _run(out, "--overwrite", "--resume", "auto")


def test_resume_auto_without_checkpoint_refuses_to_overwrite_a_log(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(train_clip.UsageError, match="no checkpoint.pt; pass --overwrite"):
        _run(out, "--resume", "auto")
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


# -- inputs checked before the first step --------------------------------------------------------------


def test_missing_zeroshot_dir_fails_before_training(tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(train_clip.UsageError, match="--zeroshot-dir: no such folder"):
        _run(out, "--zeroshot-dir", str(tmp_path / "nope"))
    assert not out.exists()  # no step ran, nothing written
    (tmp_path / "empty").mkdir()
    with pytest.raises(train_clip.UsageError, match="no class folders"):
        _run(out, "--zeroshot-dir", str(tmp_path / "empty"))


def test_csv_without_zeroshot_dir_skips_zero_shot_and_says_so(tmp_path: Path, capsys):
    data = _csv(tmp_path / "data", 4)
    summary = _run(tmp_path / "run", "--train-data", str(data), "--batch-size", "4")
    assert summary["zero_shot_top1"] is None and summary["zero_shot_set"] is None
    assert "no --zeroshot-dir" in summary["zero_shot_skipped"]
    printed = capsys.readouterr().out
    assert "zero-shot: skipped" in printed and "zero-shot skipped" in printed.splitlines()[-1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["zero_shot_top1"] is None


def test_synthetic_run_names_its_zero_shot_set_and_templates(tmp_path: Path, capsys):
    summary = _run(tmp_path / "run", "--zeroshot-templates", "a {} shape;{}")
    assert summary["zero_shot_set"] == "synthetic shapes" and summary["zero_shot_templates"] == ["a {} shape", "{}"]
    printed = capsys.readouterr().out
    assert "templates ['a {} shape', '{}']" in printed and "on synthetic shapes" in printed.splitlines()[-1]


def test_batch_size_larger_than_the_dataset_is_refused(tmp_path: Path):
    data = _csv(tmp_path / "data", 3)
    with pytest.raises(train_clip.UsageError, match=r"--batch-size 16 is larger than the training set \(3 pairs\)"):
        _run(tmp_path / "run", "--train-data", str(data), "--batch-size", "16")
    with pytest.raises(train_clip.UsageError, match=r"\(4 pairs\).*--batch-size 4 or less"):
        _run(tmp_path / "run", "--synthetic-size", "4")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--save-every", "-1"], "--save-every must be >= 0"),
        (["--eval-every", "-2"], "--eval-every must be >= 0"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--beta2", "1.0"], r"--beta2 must be in \[0, 1\)"),
        (["--zeroshot-templates", "a photo"], "'a photo' needs exactly one '{}'"),
        (["--zeroshot-templates", "a {} of {name}"], "needs exactly one"),
        (["--zeroshot-templates", ";"], "--zeroshot-templates is empty"),
        (["--model", "no-such-model"], "not an open_clip model config"),
    ],
)
def test_bad_counts_and_templates_end_with_one_line(tmp_path: Path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(train_clip.UsageError, match=message):
        _run(out, *flags)
    assert train_clip.cli([*TINY, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_clip.py: ") and "Traceback" not in err
    assert not out.exists()


def test_out_must_be_a_writable_folder_with_room(tmp_path: Path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(train_clip.UsageError, match="is a file, not a folder"):
        _run(tmp_path / "file")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    with pytest.raises(train_clip.UsageError, match="1 MiB free, a checkpoint needs about"):
        _run(tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- checkpoints that cannot be resumed ----------------------------------------------------------------


def _bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "random": (bytes(range(256)) * 40, r"is not a torch checkpoint \(unreadable"),
        "empty": (b"", r"is empty \(0 bytes"),
        "other": (None, r"is not a train_clip checkpoint \(no 'optimizer'"),
        "truncated": (data[: len(data) // 2], "is truncated or damaged"),
    }
    paths = {}
    for name, (content, message) in files.items():
        path = folder / f"{name}.pt"
        if content is None:
            torch.save({"model": {"w": torch.ones(2)}}, path)
        else:
            path.write_bytes(content)
        paths[name] = (path, message)
    return paths


@pytest.mark.parametrize("kind", ["random", "empty", "other", "truncated"])
def test_resume_of_a_bad_file_names_it_and_the_checkpoints_to_try(finished_run: Path, tmp_path: Path, kind: str):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path, message = _bad_checkpoints(out, finished_run / "checkpoint.pt")[kind]
    with pytest.raises(train_clip.UsageError, match=message) as info:
        _run(out, "--resume", str(path))
    text = str(info.value)
    assert text.startswith(f"--resume {path} ") and "weights_only" not in text
    assert f"--resume {out / 'checkpoint.pt'}, --resume {out / 'checkpoint-000002.pt'}" in text
    assert "\n" not in text


def test_resume_of_a_bad_file_alone_says_there_is_no_other(tmp_path: Path):
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(train_clip.UsageError, match=r"is empty .*and no other checkpoint in"):
        _run(tmp_path / "run", "--resume", str(tmp_path / "x.pt"))
    with pytest.raises(train_clip.UsageError, match="no such file"):
        _run(tmp_path / "run", "--resume", str(tmp_path / "missing.pt"))


# -- interrupted and failed saves ----------------------------------------------------------------------


def test_leftover_tmp_of_a_killed_save_is_removed_on_the_next_start(finished_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / ".checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")  # as torch.save left it at kill -9
    (out / ".checkpoint-000003.pt.tmp4242").write_bytes(b"half")
    (out / ".mine.tmp1").write_text("not ours")
    _run(out, "--resume", "auto", "--steps", "2")
    assert "removed 2 temporary file(s) of an interrupted save" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob(".*")) == [".mine.tmp1"]


def _failing_save(monkeypatch, fail_on_call: int, error: BaseException, on_fail=lambda: None):
    """torch.save that writes half a file and raises `error` on its `fail_on_call`-th call."""
    save, calls = torch.save, []

    def failing(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == fail_on_call:
            Path(path).write_bytes(b"PK\x03\x04" + b"\0" * 1000)
            on_fail()
            raise error
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing)


def test_disk_full_says_no_space_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--steps", "4", "--save-every", "2"]
    _failing_save(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(train_clip.StopRun, match=r"could not write .*checkpoint.pt: no space left on the device"):
        _run(out, *args)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the last good one
    assert not list(out.glob(".*tmp*"))
    monkeypatch.undo()
    assert _run(out, *args, "--resume", "auto")["steps"] == 4  # resumes from it


def test_disk_full_reported_by_torch_zip_writer_says_no_space(tmp_path: Path, monkeypatch):
    """torch.save reports ENOSPC as 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos'."""
    out = tmp_path / "run"
    error = RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 2048 vs 1998")
    usage, full = shutil.disk_usage(tmp_path), []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0) if full else usage)
    _failing_save(monkeypatch, 1, error, on_fail=lambda: full.append(True))  # the disk fills during the save
    with pytest.raises(train_clip.StopRun, match=r"no space left on the device \(0 MiB free\); no checkpoint.pt"):
        _run(out, "--steps", "1")
    assert not list(out.glob(".*tmp*"))


# -- Ctrl-C ----------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, step: int) -> None:
    log_step = train_clip.log_step

    def interrupting(run, record, *args):
        log_step(run, record, *args)
        if record["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_clip, "log_step", interrupting)


def test_sigint_says_where_the_checkpoint_is_and_how_to_resume(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--out", str(out), "--steps", "4", "--save-every", "2"]
    _interrupt_at(monkeypatch, 3)
    assert train_clip.cli(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"interrupted at step 3; the last checkpoint is {out / 'checkpoint.pt'} (step 2)" in err
    command = shlex.split(err.split("resume with: ")[1])
    assert command[-2:] == ["--resume", "auto"]
    monkeypatch.undo()
    # Interrupted again while resuming, before any step: the same checkpoint, the same advice.
    monkeypatch.setattr(train_clip, "open_logs", lambda run, state: (_ for _ in ()).throw(KeyboardInterrupt))
    assert train_clip.cli(command[2:]) == 130
    assert f"the last checkpoint is {out / 'checkpoint.pt'} (step 2); resume with:" in capsys.readouterr().err
    monkeypatch.undo()
    assert train_clip.main(command[2:])["steps"] == 4  # the printed command continues the run


def test_sigint_before_the_first_checkpoint_says_nothing_to_resume(tmp_path: Path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 1)
    assert train_clip.cli([*TINY, "--out", str(tmp_path / "run"), "--save-every", "5"]) == 130
    assert "before the first checkpoint (--save-every 5): nothing to resume" in capsys.readouterr().err


def test_sigint_during_the_final_evaluation_points_at_the_final_checkpoint(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(train_clip, "evaluate", lambda run, step: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "run"
    assert train_clip.cli([*TINY, "--out", str(out)]) == 130
    assert f"interrupted at step 2; the last checkpoint is {out / 'checkpoint.pt'} (step 2)" in capsys.readouterr().err


def test_interrupted_save_leaves_no_tmp(tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    _failing_save(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(train_clip.Interrupted, match=r"the last checkpoint is .* \(step 2\)"):
        _run(out, "--steps", "4", "--save-every", "2")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not list(out.glob(".*tmp*"))


# -- --help ----------------------------------------------------------------------------------------------


def test_help_shows_real_defaults(capsys):
    with pytest.raises(SystemExit):
        train_clip.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]  # unwrapped, past the usage line
    for flag, default in (("--lr", "0.002"), ("--beta1", "0.9"), ("--beta2", "0.98"), ("--optimizer", "'stableadamw'"),
                          ("--eps", "1e-06"), ("--csv-separator", r"'\t'"), ("--log-every", "10")):  # fmt: skip
        assert f"{flag} " in text and f"(default: {default})" in text.split(f"{flag} ", 1)[1].split(" --")[0], flag
    for switch in ("--no-monitor", "--no-progress", "--no-tensorboard", "--overwrite", "--swap-all"):
        assert "(default:" not in text.split(f"{switch} ", 1)[1].split(" --")[0], switch
    assert "turn the SpikeMonitor off (it is on)" in text


def test_the_script_imports_its_siblings_without_editing_sys_path():
    source = Path(train_clip.__file__).read_text()
    assert not re.search(r"sys\.path\.(insert|append)|sys\.path\s*=", source)
