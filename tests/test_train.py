"""Trainer: exact kill-and-resume, lr schedule and groups, non-finite steps, bad samples, atomic saves."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import evl.train.state as train_state
from evl.checkpoint import load_model_state, read_config
from evl.errors import CheckpointError, ConfigError
from evl.train.data import GlobalBatchSampler, skip_none_collate
from evl.train.optim import build_param_groups, lr_factor
from evl.train.trainer import (
    Callback,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    UnreadableDataError,
    latest_checkpoint,
    unwrap_model,
)


class NoisyData(torch.utils.data.Dataset):
    """Regression data with *data-side* randomness (torch, numpy and python RNG) in __getitem__."""

    def __init__(self, n: int = 48, none_at: set[int] | None = None, bad_at: set[int] | None = None):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 5, generator=g)
        self.none_at = none_at or set()
        self.bad_at = bad_at or set()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i in self.none_at:
            return None
        jitter = torch.randn(5) * 0.1 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        x = self.x[i] + jitter
        return {"x": x, "y": x.sum(), "bad": torch.tensor(i in self.bad_at), "video_names": f"clip{i}.mp4"}


def collate(samples: list[dict]) -> dict:
    return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples]),
            "bad": torch.stack([s["bad"] for s in samples]), "video_names": [s["video_names"] for s in samples],
            "mask_noise": torch.rand(len(samples))}  # randomness inside collate (like MLM masking)


class DropoutModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 16)
        self.drop = nn.Dropout(0.3)
        self.cross_attn = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.gate = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.body(x)))
        h = h + torch.tanh(self.gate) * self.cross_attn(h) + self.cross_attn(h) * 0.1
        return self.head(self.norm(h)).sum(-1)


def loss_fn(model: nn.Module, batch: dict) -> dict:
    err = model(batch["x"]) - batch["y"] + 0.01 * batch["mask_noise"]
    loss = (err**2).mean()
    if batch["bad"].any():
        loss = loss * float("nan")
    return {"loss": loss, "mae": err.abs().mean(), "not_a_scalar": err}


def make_model(seed: int = 0) -> DropoutModel:
    torch.manual_seed(seed)
    return DropoutModel()


def cfg_for(out_dir, **kw) -> TrainConfig:
    base = dict(max_steps=12, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=3, ckpt_every=5, log_every=1,
                out_dir=str(out_dir), seed=3, lr_mults={"head": 3.0})
    base.update(kw)
    return TrainConfig(**base)


class KillAfter(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt("simulated kill")


def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ (1) resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_killed_and_resumed_run_logs_exactly_the_same_losses(tmp_path, num_workers):
    full = Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path / "a", num_workers=num_workers),
                   collate_fn=collate).fit()
    assert full.steps == 12 and len(full.history) == 12

    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_model(), loss_fn, NoisyData(), cfg_for(b, num_workers=num_workers), collate_fn=collate,
                callbacks=[KillAfter(7)]).fit()  # checkpoint at 5, killed after 7: steps 6-7 are replayed
    assert latest_checkpoint(b).name == "step_00000005"
    # a different initialisation: the resumed weights must come from the checkpoint
    resumed = Trainer(make_model(seed=99), loss_fn, NoisyData(), cfg_for(b, num_workers=num_workers),
                      collate_fn=collate).fit(resume=True)
    assert [r["step"] for r in resumed.history] == list(range(6, 13))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[5:]]
    a_log, b_log = _metrics(tmp_path / "a"), _metrics(b)
    assert [r["step"] for r in b_log] == list(range(1, 13))  # lines after step 5 were replaced, not duplicated
    for ra, rb in zip(a_log, b_log, strict=True):
        assert (ra["loss"], ra["mae"], ra["lr"], ra["grad_norm"]) == (rb["loss"], rb["mae"], rb["lr"], rb["grad_norm"])


def test_dropout_and_data_noise_matter(tmp_path):
    """Guard for the test above: with another seed the losses differ, so equality is not vacuous."""
    a = Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path / "a", max_steps=3), collate_fn=collate).fit()
    b = Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path / "b", max_steps=3, seed=4),
                collate_fn=collate).fit()
    assert a.history[0]["loss"] != b.history[0]["loss"]


def test_checkpoint_contents_are_pickle_free_and_loadable(tmp_path):
    res = Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, max_steps=5, keep_last=1),
                  collate_fn=collate, model_config={"width": 16}).fit()
    ckpt = latest_checkpoint(tmp_path)
    assert str(ckpt) == res.checkpoint_dir
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "rng_rank0.json", "rng_rank0.safetensors", "trainer_state.json"]
    assert read_config(ckpt) == {"width": 16}
    assert load_model_state(DropoutModel(), ckpt).ok
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["samples_in_epoch"]) == (5, 0, 40)


def test_resume_with_other_global_batch_is_refused(tmp_path):
    Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, max_steps=5), collate_fn=collate).fit()
    with pytest.raises(CheckpointError, match="train.batch_size=8"):
        Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, batch_size=4, grad_accum=1),
                collate_fn=collate).fit(resume=True)


# ------------------------------------------------------------------------- (3) (4) lr and groups


def test_lr_schedule_values_at_known_steps():
    f = lambda s, sched="cosine": lr_factor(s, max_steps=14, warmup_steps=4, schedule=sched, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(14) == pytest.approx(0.1)
    assert f(13) > 0.1  # the last update is not wasted at the minimum
    assert all(f(s) >= f(s + 1) for s in range(3, 14))
    assert [f(s, "constant") for s in (0, 3, 8, 13)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(0, 10, 0, "cosine", 0.0) == 1.0


def test_lr_multipliers_and_no_decay_groups():
    model = make_model()
    groups = build_param_groups(model, weight_decay=0.05, lr_mults={"cross_attn": 4.0, "head": 2.0})
    where = {name: (g["lr_mult"], g["weight_decay"]) for g in groups for name in g["param_names"]}
    assert where == {
        "body.weight": (1.0, 0.05), "body.bias": (1.0, 0.0),
        "cross_attn.weight": (4.0, 0.05), "cross_attn.bias": (4.0, 0.0),
        "norm.weight": (1.0, 0.0), "norm.bias": (1.0, 0.0), "gate": (1.0, 0.0),
        "head.weight": (2.0, 0.05), "head.bias": (2.0, 0.0),
    }
    model.body.weight.requires_grad_(False)
    assert "body.weight" not in {n for g in build_param_groups(model, 0.05) for n in g["param_names"]}


def test_trainer_sets_group_lrs_from_schedule_and_multiplier(tmp_path):
    seen = []

    class Spy(Callback):
        def on_step_end(self, trainer, record):
            seen.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})

    cfg = cfg_for(tmp_path, max_steps=4, warmup_steps=2, lr=0.1, lr_mults={"head": 3.0}, schedule="constant")
    res = Trainer(make_model(), loss_fn, NoisyData(), cfg, collate_fn=collate, callbacks=[Spy()]).fit()
    assert [r["lr"] for r in res.history] == [0.05, 0.1, 0.1, 0.1]
    assert seen[0]["head"] == pytest.approx(0.15) and seen[0]["base"] == pytest.approx(0.05)
    assert seen[3]["head_no_decay"] == pytest.approx(0.3) and seen[3]["base_no_decay"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- (5) non-finite


def test_nonfinite_step_is_skipped_and_named(tmp_path, capsys):
    snapshots = []

    class Snap(Callback):
        def on_step_end(self, trainer, record):
            snapshots.append({k: v.clone() for k, v in unwrap_model(trainer.wrapped).state_dict().items()})

    # grad_accum=1, 8 per step, no shuffle-dependence: sample 13 is bad wherever it lands
    cfg = cfg_for(tmp_path, max_steps=6, grad_accum=1)
    res = Trainer(make_model(), loss_fn, NoisyData(bad_at={13}), cfg, collate_fn=collate,
                  callbacks=[Snap()]).fit()
    bad_steps = [r["step"] for r in res.history if not math.isfinite(r["loss"])]
    assert len(bad_steps) == 1 and res.nonfinite_steps == 1  # 48 samples = 6 steps: 13 is seen once
    s = bad_steps[0]
    before = snapshots[s - 2] if s > 1 else None
    if before is not None:  # no optimizer update on the bad step
        assert all(torch.equal(before[k], snapshots[s - 1][k]) for k in before)
    assert all(math.isfinite(r["loss"]) for r in res.history if r["step"] != s)
    assert "clip13.mp4" in capsys.readouterr().err


def test_stops_after_max_nonfinite_in_a_row(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=10, max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        Trainer(make_model(), loss_fn, NoisyData(bad_at=set(range(48))), cfg, collate_fn=collate).fit()


# -------------------------------------------------------------------------- (7) bad samples


def test_none_samples_are_dropped_and_counted(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=2, grad_accum=1)  # 16 samples, 2 steps of 8 = one full epoch
    res = Trainer(make_model(), loss_fn, NoisyData(n=16, none_at={0, 5, 10, 15}), cfg, collate_fn=collate).fit()
    assert res.skipped_samples == 4
    assert res.history[-1]["skipped_samples"] == 4
    assert all(math.isfinite(r["loss"]) for r in res.history)
    assert _metrics(tmp_path)[-1]["skipped_samples"] == 4


def test_all_none_batches_are_skipped(tmp_path):
    records = []

    class Keep(Callback):
        def on_step_end(self, trainer, record):
            records.append(record)

    cfg = cfg_for(tmp_path, max_steps=2, grad_accum=1)
    # each step is skipped, fewer in a row than train.max_bad_steps: no crash, but no weight changed
    # either, so the run ends in an error instead of saving the initial model as trained
    with pytest.raises(UnreadableDataError, match="none of the 2 steps updated the weights"):
        Trainer(make_model(), loss_fn, NoisyData(n=16, none_at=set(range(16))), cfg, collate_fn=collate,
                callbacks=[Keep()]).fit()
    assert len(records) == 2 and records[-1]["skipped_samples"] == 16
    assert all(r.get("skipped_batch") for r in records)


def test_skip_none_collate_default_collate():
    out = skip_none_collate()([None, torch.ones(2), None, torch.zeros(2)])
    assert out.skipped == 2 and out.batch.shape == (2, 2)
    assert skip_none_collate()([None]).batch is None


# ----------------------------------------------------------------------------- (6) atomic save


def test_failed_checkpoint_leaves_previous_one_loadable(tmp_path, monkeypatch):
    real = train_state.save_tensor_tree
    calls = {"n": 0}

    def flaky(directory, name, tree):
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint (step 4): die half-way through writing it
            (directory / "optimizer.safetensors").write_bytes(b"partial")
            raise OSError("killed while writing")
        return real(directory, name, tree)

    monkeypatch.setattr(train_state, "save_tensor_tree", flaky)
    with pytest.raises(OSError, match="killed while writing"):
        Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, max_steps=6, ckpt_every=2),
                collate_fn=collate).fit()
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert not (root / "step_00000004").exists()
    monkeypatch.undo()
    res = Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, max_steps=6, ckpt_every=2),
                  collate_fn=collate).fit(resume=True)
    assert res.history[0]["step"] == 3 and res.steps == 6
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the stale temp dir was cleaned


# ---------------------------------------------------------------------------------- misc


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    def steps(world: int, accum: int) -> list[set[int]]:
        micro = 8 // (world * accum)
        per_rank = [list(GlobalBatchSampler(30, micro, world, r, accum, seed=5, epoch=2)) for r in range(world)]
        out = []
        for s in range(30 // 8):
            idx = set()
            for r in range(world):
                for m in per_rank[r][s * accum:(s + 1) * accum]:
                    idx |= set(m)
            out.append(idx)
        return out

    ref = steps(1, 1)
    assert all(len(s) == 8 for s in ref) and len(set().union(*ref)) == 24
    assert steps(2, 1) == ref and steps(2, 2) == ref and steps(4, 2) == ref and steps(1, 4) == ref
    resumed = list(GlobalBatchSampler(30, 2, 2, 1, 2, seed=5, epoch=2, start_micro=4))
    assert resumed == list(GlobalBatchSampler(30, 2, 2, 1, 2, seed=5, epoch=2))[4:]


def test_bf16_autocast_on_cpu_trains(tmp_path):
    res = Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, max_steps=2, precision="bf16"),
                  collate_fn=collate).fit()
    assert all(math.isfinite(r["loss"]) for r in res.history)


def test_config_errors_are_actionable(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        Trainer(make_model(), loss_fn, NoisyData(), cfg_for(tmp_path, batch_size=6, grad_accum=4),
                collate_fn=collate).fit()
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        Trainer(make_model(), loss_fn, NoisyData(n=4), cfg_for(tmp_path), collate_fn=collate).fit()
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_train_config_from_dict_is_strict():
    from evl.config import from_dict

    cfg = from_dict(TrainConfig, {"lr_mults": {"cross": 4}, "betas": [0.9, 0.98], "schedule": "constant"})
    assert cfg.lr_mults == {"cross": 4} and cfg.schedule == "constant"
    with pytest.raises(ConfigError, match="did you mean 'schedule'"):
        from_dict(TrainConfig, {"schedul": "cosine"})


def test_logger_progress_bar_and_plain_lines(tmp_path, capsys):
    from evl.train.log import MetricsLogger

    bar = MetricsLogger(tmp_path / "bar", max_steps=3, start_step=0, log_every=2, progress_bar=True)
    for s in (1, 2, 3):
        bar.log({"step": s, "loss": 1.0 / s, "clips_per_s": 10.0})
    bar.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "bar" / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    plain = MetricsLogger(tmp_path / "plain", max_steps=3, start_step=0, log_every=1, progress_bar=False)
    plain.log({"step": 1, "loss": 0.5, "clips_per_s": 10.0})
    plain.close()
    assert "step 1/3  loss 0.5" in capsys.readouterr().out
    off = MetricsLogger(tmp_path / "off", max_steps=3, start_step=0, log_every=1, enabled=False)
    off.log({"step": 1, "loss": 0.5})
    assert not (tmp_path / "off" / "metrics.jsonl").exists()


def test_resume_with_another_grad_accum_sees_the_same_samples(tmp_path):
    """The data position is stored in samples, not micro-batches: a run checkpointed with
    grad_accum=2 and resumed with grad_accum=1 (same global batch) trains step s on exactly the
    samples of an uninterrupted run's step s, and ends at max_steps (no bare StopIteration)."""

    def recording():
        steps: list[set[str]] = [set()]

        def fn(model, batch):
            if len(batch["video_names"]) > 2:     # the 2-sample probe pass before training is no step
                steps[-1].update(batch["video_names"])
            return loss_fn(model, batch)

        class NextStep(Callback):
            def on_step_end(self, trainer, record):
                steps.append(set())

        return steps, fn, NextStep()

    full_steps, fn, cb = recording()
    Trainer(make_model(), fn, NoisyData(), cfg_for(tmp_path / "a", max_steps=9, grad_accum=2), collate_fn=collate,
            callbacks=[cb]).fit()
    b = tmp_path / "b"
    Trainer(make_model(), loss_fn, NoisyData(), cfg_for(b, max_steps=5, grad_accum=2), collate_fn=collate).fit()
    resumed_steps, fn, cb = recording()
    res = Trainer(make_model(), fn, NoisyData(), cfg_for(b, max_steps=9, grad_accum=1), collate_fn=collate,
                  callbacks=[cb]).fit(resume=True)
    assert res.steps == 9 and [r["step"] for r in res.history] == [6, 7, 8, 9]   # step 7 crosses into epoch 1
    assert resumed_steps[:4] == full_steps[5:9]
    assert all(len(s) == 8 for s in resumed_steps[:4])
