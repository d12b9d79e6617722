"""examples/formats_study.py end to end on a tiny setting (2 formats, 1 seed, 2 steps of 8 pairs, ~20 s):
the results and SQNR tables, --resume skipping finished cells, and the refusal to overwrite a study."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import formats_study  # noqa: E402

FORMATS = ("fp32", "mxfp8")
TINY_TRAIN = "--synthetic-size 64 --zeroshot-samples 30 --val-size 16"


def tiny_argv(out: Path) -> list[str]:
    return [
        *("--out", str(out), "--formats", ",".join(FORMATS), "--seeds", "0", "--steps", "2", "--batch-size", "8"),
        *("--warmup", "1", "--probe-batch", "8", f"--train-args={TINY_TRAIN}"),
    ]


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, formats_study.main(tiny_argv(out))


def test_results_table(study):
    out, result = study
    names = [r["name"] for r in result["runs"]]
    # 2 formats x {no layer-scale, zero-init} x {StableAdamW, AdamW} x 1 seed
    assert names == [
        f"{fmt}-{ls}-{opt}-s0" for fmt in FORMATS for ls in ("nols", "ls0") for opt in ("stableadamw", "adamw")
    ]
    by_name = {r["name"]: r for r in result["runs"]}
    rows = table_rows((out / "study.md").read_text(), "| format |")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (fmt, ls, opt, "0") for fmt in FORMATS for ls in ("none", "zero-init") for opt in ("StableAdamW", "AdamW")
    ]
    for row, run in zip(rows, result["runs"]):
        summary = json.loads((out / "runs" / run["name"] / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["precision"] == run["format"]
        assert float(row[4]) == pytest.approx(100 * summary["zero_shot_top1"], abs=0.05)
        assert float(row[7]) == pytest.approx(summary["final_loss_mean10"], abs=5e-4)
        assert re.fullmatch(r"\d+\.\d / \d+\.\d", row[9])  # RMS / loss spikes
        # the paired differences to the fp32 run of the same layer-scale, optimizer and seed
        fp32 = by_name[run["name"].replace("mxfp8", "fp32")]
        if run["format"] == "fp32":
            assert row[6] == row[8] == "-"
        else:
            assert row[6] == f"{100 * (run['zero_shot_top1'] - fp32['zero_shot_top1']):.1f}"
            assert row[8] == f"{run['final_loss'] - fp32['final_loss']:.3f}"
        # features of the final model: positive, finite, and the residual stream max from a real block
        assert 0 < float(row[11]) < 1e4 and 0 < float(row[12]) < 1e4
        assert "resblocks" in run["max_residual_block"]
        assert (out / "runs" / run["name"] / "features.json").exists()


def test_sqnr_table(study):
    out, result = study
    assert result["sqnr_model"] == "fp32-nols-stableadamw-s0"
    rows = table_rows((out / "study.md").read_text(), "| layer |")
    layers = {r[0]: r[1] for r in rows}
    # every block linear of both towers is measured (16), forward and grad-input
    weights = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    blocks = [f"{tower}.{i}.{w}" for tower in ("visual", "text") for i in (0, 1) for w in weights]
    assert set(blocks) <= set(layers)
    for name in blocks:
        forward, grad = (float(v) for v in layers[name].split(" / "))
        # e4m3 with 32-element blocks: ~25-35 dB; far from both an exact copy and noise
        assert 18 < forward < 45 and 18 < grad < 45, (name, forward, grad)


def test_resume_and_refusals(study, capsys):
    out, _ = study
    summaries = sorted((out / "runs").glob("*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    table = (out / "study.md").read_text()
    capsys.readouterr()

    # an existing study is not touched without --resume / --overwrite
    assert formats_study.cli(tiny_argv(out)) == 2
    assert "already holds a study" in capsys.readouterr().err
    # --resume with other settings would mix them
    assert formats_study.cli([*tiny_argv(out), "--resume", "--steps", "3"]) == 2
    assert "settings differ" in capsys.readouterr().err

    # --resume skips every finished cell and writes the same table
    assert formats_study.cli([*tiny_argv(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("finished before") == len(summaries) == 8
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    assert (out / "study.md").read_text() == table

    # --overwrite removes the study's files (checked on the folder alone: no retraining)
    args = formats_study.parse_args([*tiny_argv(out), "--overwrite"])
    formats_study.prepare_out(args)
    assert list((out / "runs").iterdir()) == [] and not (out / "study.md").exists()


def test_mean_std():
    assert formats_study.mean_std([0.70, 0.72, 0.74], 100) == "72.0 ± 2.0"
    assert formats_study.mean_std([2.5], digits=3) == "2.500"
