"""`evl shard` and training from tar shards: the shards and their index, streaming by rank and worker,
exact mid-epoch resume, bad members and missing shards (tiny shards made here from a generated SynthVL)."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evl.cli import app
from evl.data.datasets import ClipSettings
from evl.data.shard_stream import ShardStream, deal_shards, expand_shards, is_shard_source
from evl.data.shard_write import INDEX_FILE, write_shards
from evl.errors import ConfigError
from evl.train.data import GlobalBatchSampler, make_train_loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
CLIP = ClipSettings(num_frames=4, size=32, train=True)


@pytest.fixture(scope="module")
def shards(synthvl, tmp_path_factory):
    """The 45 pretraining records of the session SynthVL as video shards of 5 samples (9 shards)."""
    out = tmp_path_factory.mktemp("shards") / "video"
    write_shards(synthvl / "annotations" / "pretrain.json", synthvl / "videos", out, samples_per_shard=5)
    return out


def _ids(samples: list[dict]) -> dict:
    """A collate that keeps what these tests look at: each sample's id (and its frames' shape)."""
    return {"index": torch.tensor([s["index"] for s in samples]), "frames": torch.stack([s["frames"] for s in samples])}


def _collect(stream: ShardStream, epoch: int, start_micro: int = 0, workers: int = 0) -> list[list[int]]:
    """Sample ids of every micro-batch this rank's loader yields in an epoch (from `start_micro` on)."""
    sampler = GlobalBatchSampler(len(stream), stream.micro_batch, stream.world_size, stream.rank, stream.grad_accum,
                                 seed=3, epoch=epoch, start_micro=start_micro)
    loader = make_train_loader(stream, _ids, sampler, workers, pin_memory=False)
    return [b.batch["index"].tolist() for b in loader]


def _stream(shards: Path, world: int = 1, rank: int = 0, workers: int = 0, micro: int = 2, **kw) -> ShardStream:
    return ShardStream(shards, CLIP, "caption", world_size=world, rank=rank, workers=workers, micro_batch=micro,
                       grad_accum=1, **kw)


# ------------------------------------------------------------------------------------------ writing


def test_shards_hold_every_record_with_an_index_and_read_in_webdataset(shards, synthvl):
    from evl.data.annotations import read_annotations

    records = read_annotations(synthvl / "annotations" / "pretrain.json")
    index = json.loads((shards / INDEX_FILE).read_text())
    assert index["total"] == len(records) == 45 and index["mode"] == "video" and index["skipped"] == {}
    assert [s["samples"] for s in index["shards"]] == [5] * 9
    with tarfile.open(shards / "000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.json", "000000000.mp4"]
    meta = json.loads((shards / "000000.tar.idx.json").read_text())["samples"][0]
    assert meta["key"] == "000000000" and set(meta["members"]) == {"json", "mp4"}
    # the video bytes are the original file's, and a WebDataset reader sees the same samples
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(shards / "000000.tar"), shardshuffle=False)))
    assert first["mp4"] == (synthvl / "videos" / records[0].video).read_bytes()
    assert json.loads(first["json"])["captions"] == records[0].captions


def test_undecodable_videos_are_left_out_and_listed(synthvl, tmp_path):
    ann = json.loads((synthvl / "annotations" / "pretrain.json").read_text())[:6]
    videos = tmp_path / "videos"
    videos.mkdir()
    for r in ann:
        (videos / r["video"]).write_bytes((synthvl / "videos" / r["video"]).read_bytes())
    (videos / ann[0]["video"]).write_bytes(b"not a video")
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    index = write_shards(tmp_path / "ann.json", videos, tmp_path / "out", samples_per_shard=4)
    bad = [r for r in ann if r["video"] == ann[0]["video"]]
    assert index["total"] == 6 - len(bad) and list(index["skipped"]) == [ann[0]["video"]]
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards(tmp_path / "ann.json", videos, tmp_path / "out")


def test_predecoded_shards_hold_the_frames_the_decoder_gives(synthvl, tmp_path):
    from evl.data.video import load_clip

    ann = synthvl / "annotations" / "pretrain.json"
    write_shards(ann, synthvl / "videos", tmp_path / "frames", samples_per_shard=20, frames=4, size=32)
    assert json.loads((tmp_path / "frames" / INDEX_FILE).read_text())["mode"] == "frames"
    stream = ShardStream(tmp_path / "frames", ClipSettings(num_frames=4, size=32, train=False), "caption",
                         world_size=1, rank=0, workers=0, micro_batch=2, grad_accum=1)
    sample = stream[0]
    ref = load_clip(synthvl / "videos" / stream.head_records(1)[0].video, 4, "uniform")
    assert sample["frames"].shape == (4, 3, 32, 32) and sample["frame_mask"].tolist() == ref.frame_mask.tolist()
    assert torch.equal(stream.transform(ref.frames), sample["frames"])   # 32x32 clips: stored as decoded


def test_cli_shard_and_bad_options(synthvl, tmp_path):
    ann = str(synthvl / "annotations" / "pretrain.json")
    result = runner.invoke(app, ["shard", ann, "--out", str(tmp_path / "s"), "--samples-per-shard", "20"])
    assert result.exit_code == 0, result.output
    assert "45 samples in 3 shards (video); train with data.train=" in result.output
    assert "{000000..000002}.tar" in result.output
    for args, message in ((["--frames", "4"], "--frames and --size go together"),
                          (["--samples-per-shard", "0"], "must be >= 1"),
                          (["--frames", "0", "--size", "32"], "--frames 0")):
        result = runner.invoke(app, ["shard", ann, "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output, result.output


# ------------------------------------------------------------------------------------------ reading


def test_patterns_and_a_missing_shard(shards, tmp_path):
    assert expand_shards(f"{shards}/{{000000..000008}}.tar") == sorted(shards.glob("*.tar"))
    assert expand_shards(shards) == sorted(shards.glob("*.tar"))
    assert is_shard_source(f"{shards}/{{000000..000008}}.tar") and is_shard_source(shards)
    assert not is_shard_source(tmp_path / "train.json")
    with pytest.raises(ConfigError, match=r"1 of 10 shards do not exist \(first: .*000009\.tar\)"):
        expand_shards(f"{shards}/{{000000..000009}}.tar")
    with pytest.raises(ConfigError, match="is empty"):
        expand_shards(f"{shards}/{{000003..000001}}.tar")


def test_shards_are_dealt_evenly_and_refused_when_too_few():
    assert deal_shards([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    dealt = deal_shards([10, 1, 1, 1, 7], 2)
    assert sorted(i for d in dealt for i in d) == [0, 1, 2, 3, 4]
    assert sorted(sum([10, 1, 1, 1, 7][i] for i in d) for d in dealt) == [10, 10]
    with pytest.raises(ConfigError, match="3 shards for 4 loader streams"):
        deal_shards([1, 1, 1], 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, workers):
    """2 ranks × (1 or 2) workers, micro-batch 2: 9 shards of 5 are dealt to 2 or 4 streams; each epoch every
    rank yields the same number of micro-batches, no sample twice, and all but the dealt remainder."""
    seen = []
    counts = []
    for rank in (0, 1):
        stream = _stream(shards, world=2, rank=rank, workers=workers)
        batches = _collect(stream, epoch=0, workers=workers)
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    assert counts[0] == counts[1] == len(stream) // (2 * 2)
    assert len(seen) == len(set(seen)) == len(stream)
    assert len(stream) >= 45 - 2 * max(1, workers) * 2 - 5   # what the smallest stream cannot fill is left out


def test_order_is_shuffled_per_epoch_and_replays_exactly(shards):
    stream = _stream(shards, micro=5, shuffle_buffer=8)   # 45 samples = 9 micro-batches: all of them each epoch
    a, b = _collect(stream, epoch=0), _collect(stream, epoch=1)
    assert sorted(i for x in a for i in x) == sorted(i for x in b for i in x) == list(range(45)) and a != b
    assert _collect(stream, epoch=0) == a   # a pure function of (seed, epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_continues_with_exactly_the_batches_of_an_uninterrupted_one(shards, workers):
    stream = _stream(shards, workers=workers)
    full = _collect(stream, epoch=2, workers=workers)
    for start in (1, 4, len(full) - 1):
        assert _collect(stream, epoch=2, start_micro=start, workers=workers) == full[start:], start


def test_a_corrupt_video_or_record_is_replaced_counted_and_logged(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in shards.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    entries = json.loads((bad / "000000.tar.idx.json").read_text())["samples"]
    data = bytearray((bad / "000000.tar").read_bytes())
    offset, size = entries[1]["members"]["mp4"]
    data[offset:offset + size] = b"\0" * size          # the tar stays a tar; one video inside is garbage
    offset, size = entries[3]["members"]["json"]
    data[offset:offset + size] = b"{" * size            # and one record is not JSON
    (bad / "000000.tar").write_bytes(bytes(data))
    stream = _stream(bad, micro=5, shuffle_buffer=1)
    sampler = GlobalBatchSampler(len(stream), 5, 1, 0, 1, seed=0, epoch=0)
    with caplog.at_level(logging.WARNING):
        batches = list(make_train_loader(stream, _ids, sampler, 0, pin_memory=False))
    assert sum(b.skipped for b in batches) == 2 and all(len(b.batch["index"]) == 5 for b in batches)
    assert "skipping shard sample 000000.tar:000000001" in caplog.text
    assert "skipping shard sample 000000.tar:000000003" in caplog.text


def test_a_stream_refuses_a_layout_it_was_not_built_for(shards):
    stream = _stream(shards, world=1, workers=0)
    sampler = GlobalBatchSampler(len(stream), 2, 1, 0, 1, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="laid out for"):
        make_train_loader(stream, _ids, sampler, 2, pin_memory=False)


# ------------------------------------------------------------------------------------------ training


def _recipe(path: Path, shards: Path, out: Path, model: dict, workers: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "task": "pretrain", "model": model, "objectives": {"vtc": 1.0, "mlm": 1.0},
        "data": {"train": f"{shards}/{{000000..000008}}.tar", "shuffle_buffer": 6},
        # 2 ranks x 1 worker: 2 streams of 4 or 5 shards (20-25 samples), micro-batch 4 → 5 steps per epoch,
        # so the 8 steps cross into epoch 1; checkpoints every 2 steps
        "train": {"max_steps": 8, "batch_size": 8, "log_every": 1, "ckpt_every": 2, "keep_last": 0, "seed": 0,
                  "lr": 1e-3, "precision": "fp32", "num_workers": workers, "out_dir": str(out)}}))
    return path


def _torchrun(recipe: Path, *args: str, wait: bool = True):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evl.cli", "pretrain", str(recipe), "--no-eval", *args]
    root = Path(__file__).resolve().parents[1]
    if not wait:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_killed_mid_epoch_and_resumed_train_exactly_as_uninterrupted(shards, tiny_model_dict_factory,
                                                                                 tmp_path):
    import os
    import signal
    import time

    from safetensors.torch import load_file

    model = tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _torchrun(_recipe(tmp_path / "a.yaml", shards, whole, model, workers=1))
    child = _torchrun(_recipe(tmp_path / "b.yaml", shards, cut, model, workers=1), wait=False)
    deadline = time.monotonic() + 300
    try:   # killed (the whole process group, SIGKILL) once step 2's checkpoint is committed
        while not (cut / "checkpoints" / "step_00000002" / "trainer_state.json").is_file():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 2"
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    at = json.loads((cut / "checkpoints" / "latest.json").read_text())["step"]
    assert 2 <= at < 8 and at % 5, at   # killed before the end, and the checkpoint is mid-epoch (5 steps each)
    resumed = _torchrun(tmp_path / "b.yaml", "--resume")
    assert "resumed from" in resumed.stderr

    def losses(out):
        return [{k: r[k] for k in ("step", "loss", "vtc", "mlm", "lr")}
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    assert losses(cut) == losses(whole) and [r["step"] for r in losses(whole)] == list(range(1, 9))
    assert len({r["loss"] for r in losses(whole)}) == 8
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # the fallback when the world size changes: the 2-rank run's step-4 checkpoint resumed by one process
    # (2 streams of 4 per micro-batch → 1 stream of 8: still 5 steps per epoch; the rest of epoch 0 comes from
    # the one stream, so its losses differ from the 2-rank run's, and the run ends at step 8)
    import shutil

    from evl.recipes import load_recipe, run_recipe

    one = tmp_path / "one"
    shutil.copytree(whole, one)
    for name in ("step_00000006", "step_00000008"):
        shutil.rmtree(one / "checkpoints" / name)
    (one / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "dir": "step_00000004"}))
    shutil.rmtree(one / "final")
    (one / "summary.json").unlink()
    summary = run_recipe(load_recipe(tmp_path / "a.yaml", [f"train.out_dir={one}"]), resume=True, evaluate=False)
    assert summary["steps"] == 8 and [r["step"] for r in losses(one)] == list(range(1, 9))
    assert losses(one)[:4] == losses(whole)[:4]   # the steps before the checkpoint are the 2-rank run's

    # the same streams under FSDP2: the same samples, so the same losses up to float reduction order
    fsdp = tmp_path / "fsdp"
    _torchrun(_recipe(tmp_path / "c.yaml", shards, fsdp, model, workers=1), "train.strategy=fsdp")
    for x, y in zip(losses(fsdp), losses(whole), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x, y)


def test_a_resume_with_another_worker_count_goes_on_at_the_same_point_of_the_epoch(shards, tiny_model_dict_factory,
                                                                                  tmp_path):
    """The fallback when the layout changes: the run resumes at the same sample count of the epoch under the
    new layout's streams (here 1 stream → 2: epochs of 5 steps become 4), trains to the end and says where."""
    import shutil

    from evl.recipes import load_recipe, run_recipe

    model = tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", shards, out, model, workers=0)
    run_recipe(load_recipe(recipe), evaluate=False)
    for name in ("step_00000006", "step_00000008"):
        shutil.rmtree(out / "checkpoints" / name)
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "dir": "step_00000004"}))
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    summary = run_recipe(load_recipe(recipe, ["train.num_workers=2"]), resume=True, evaluate=False)
    assert summary["steps"] == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    # step 4 was 32 samples into a 40-sample epoch; under 2 streams an epoch holds 32, so training went on with
    # epoch 1 from its start: steps 5-8 are epoch 1's 4 steps, and step 8 closed it
    assert (state["epoch"], state["samples_in_epoch"]) == (2, 0)
