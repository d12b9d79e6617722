"""lowbit.integrations.transformers: a tiny BERT, swapped, trained by the Hugging Face Trainer with
StableAdamW and the SpikeMonitor callback, then resumed from a checkpoint."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository's kernels/ folder, seen as a top-level `kernels` while the repository root is on
# sys.path (pytest and `python -m` put it there), raises ModuleNotFoundError when imported
# (kernels/__init__.py); transformers 5.24 probes Hugging Face's `kernels` package by importing it and
# does not catch that. Its probe is cached, so it runs here once with the root off sys.path.
_path = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != ROOT]
try:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer  # noqa: E402, F401 - runs the probe
finally:
    sys.path[:] = _path

import lowbit  # noqa: E402
from lowbit.integrations.transformers import STATE_FILE, SpikeMonitorCallback, add_spike_monitor  # noqa: E402


def _model() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    return lowbit.swap(transformers.BertForSequenceClassification(config), "switchback", filter_fn=lowbit.ALL)


def _data(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 8), generator=g)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0] % 2)} for i in range(n)]


def _trainer(model, out: Path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    optimizer = lowbit.StableAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(optimizer, None))


def _steps(jsonl: Path) -> list[int]:
    return [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]


def test_trainer_runs_the_monitor_each_step_and_resumes(tmp_path: Path) -> None:
    model = _model()
    calls = []
    swapped = next(m for m in model.modules() if isinstance(m, lowbit.SwitchBackLinear))
    swapped.register_forward_hook(lambda *a: calls.append(1))
    trainer = _trainer(model, tmp_path / "out")
    jsonl = tmp_path / "monitor.jsonl"
    callback = add_spike_monitor(trainer, jsonl=jsonl, plot=tmp_path / "spikes.png")
    assert isinstance(callback, SpikeMonitorCallback)
    monitor_seen = []
    trainer.add_callback(_Probe(callback, monitor_seen))
    trainer.train()

    assert calls  # the swapped layers ran
    assert monitor_seen == [1, 2, 3, 4]  # the monitor's step count after each optimizer step
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(any(v is not None for v in r["rms"].values()) for r in records)
    # The monitor's loss is the step's summed loss, as the Trainer logs it.
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [r["loss"] for r in records] == pytest.approx(logged, rel=1e-3)
    assert (tmp_path / "spikes.png").stat().st_size > 0
    checkpoint = tmp_path / "out" / "checkpoint-2"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["step_count"] == 2

    # Resume at step 2: the monitor continues from its step 2 and rewrites the JSONL from there.
    resumed = _trainer(_model(), tmp_path / "out")
    callback = add_spike_monitor(resumed, jsonl=jsonl, resume_from=checkpoint)
    monitor_seen.clear()
    resumed.add_callback(_Probe(callback, monitor_seen))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert monitor_seen == [3, 4]
    again = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in records], rel=1e-4)


class _Probe(transformers.TrainerCallback):
    """Records the monitor's step count at every step end (after the monitor's callback ran)."""

    def __init__(self, callback: SpikeMonitorCallback, seen: list[int]) -> None:
        self.callback, self.seen = callback, seen

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(self.callback.monitor.step_count)


def test_a_monitor_at_another_step_than_the_trainer_is_refused(tmp_path: Path) -> None:
    """The monitor counts the Trainer's optimizer steps: resuming the Trainer without the monitor's
    state (or with another checkpoint's) would renumber the JSONL's steps, so it is an error that names
    the checkpoint to pass, raised before the JSONL is touched."""
    trainer = _trainer(_model(), tmp_path / "out")
    jsonl = tmp_path / "monitor.jsonl"
    add_spike_monitor(trainer, jsonl=jsonl)
    trainer.train()
    written = jsonl.read_bytes()
    checkpoint = tmp_path / "out" / "checkpoint-2"

    forgot = _trainer(_model(), tmp_path / "out")
    add_spike_monitor(forgot, jsonl=jsonl)  # no resume_from
    refused = r"Trainer resumes at step 2.*SpikeMonitor at step 0.*resume_from=.*checkpoint-2"
    with pytest.raises(ValueError, match=refused):
        forgot.train(resume_from_checkpoint=str(checkpoint))
    assert jsonl.read_bytes() == written

    other = _trainer(_model(), tmp_path / "out")
    add_spike_monitor(other, jsonl=jsonl, resume_from=tmp_path / "out" / "checkpoint-4")
    with pytest.raises(ValueError, match=r"Trainer resumes at step 2.*SpikeMonitor at step 4"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert jsonl.read_bytes() == written


def _two_ranks(rank: int, world: int, out: str) -> None:
    """One rank's callback, driven as the Trainer drives it, with a loss spike on rank 1 only."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    jsonl = Path(out) / "monitor.jsonl"
    callback = SpikeMonitorCallback(jsonl=jsonl, action="skip")
    actions = []
    for step in range(1, 16):
        state = SimpleNamespace(global_step=step - 1, is_world_process_zero=rank == 0)
        args = SimpleNamespace(output_dir=out)
        model(torch.ones(3, 4)).sum().backward()  # the same (all-reduced) gradients on every rank
        callback.record_loss(torch.tensor(100.0 if (step == 14 and rank == 1) else 1.0))
        callback.on_pre_optimizer_step(args, state, None, model=model, optimizer=optimizer)
        optimizer.step()
        callback.on_optimizer_step(args, state, None)
        optimizer.zero_grad()
        actions.append([e["action"] for e in callback.monitor.events if e["step"] == step])
    torch.save({"actions": actions, "weight": model.weight.detach()}, Path(out) / f"rank{rank}.pt")
    callback.on_train_end(args, state, None)


def test_ranks_judge_the_same_loss_and_only_rank_zero_writes(tmp_path: Path) -> None:
    """Under DDP every rank's monitor must take the same action (a skip on one rank only would leave
    the replicas apart), so the loss is averaged over the ranks, as the Trainer logs it; and the ranks
    must not all write the one JSONL."""
    from tests.gloo import spawn_on_gloo

    spawn_on_gloo(_two_ranks, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert ranks[0]["actions"][13] == ["skip"]  # the mean loss (50.5) spikes at step 14
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert _steps(tmp_path / "monitor.jsonl") == list(range(1, 16))
