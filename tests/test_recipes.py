"""Recipes: packaged YAML loading, overrides and their errors, and tiny end-to-end runs on SynthVL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evl.errors import ConfigError
from evl.models.model import VideoLanguageModel
from evl.recipes import load_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENIZER_VOCAB = 30522   # the packaged MiniLM tokenizer's; run_recipe always tokenizes with it


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name,task", [("pretrain-tiny", "pretrain"), ("retrieval-tiny", "retrieval"),
                                       ("qa-tiny", "qa"), ("mc-tiny", "mc"), ("pretrain-tiny-vtc", "pretrain"),
                                       ("pretrain-tiny-lit", "pretrain")])
def test_packaged_recipes_load_with_model_expanded(name, task):
    r = load_recipe(name)
    assert r.task == task
    # `model: tiny` expanded to the packaged tiny config
    assert (r.model.video.hidden_size, r.model.video.num_layers, r.model.video.image_size) == (192, 4, 64)
    assert (r.model.text.pretrained, r.model.text.num_layers, r.model.fusion.kind) == ("minilm", 2, "encoder")
    assert r.data.train.startswith("runs/synthvl/annotations/") and r.train.out_dir == f"runs/{name}"


def test_efficiency_recipes_values():
    vtc, lit = load_recipe("pretrain-tiny-vtc"), load_recipe("pretrain-tiny-lit")
    assert vtc.objectives == lit.objectives == {"vtc": 1.0}
    assert (vtc.model.text.locked_layers, lit.model.text.locked_layers) == (0, 1)
    assert (vtc.model.video.conv_stem, lit.model.video.conv_stem) == (0, 32)   # the quickstart's recipe has the stem
    assert (vtc.model.fusion.dual_residual, lit.model.fusion.dual_residual) == (False, True)   # and the residual
    assert lit.model.fusion.kind == "encoder" and lit.model.fusion.num_layers == 2   # the rest of `tiny`'s fusion kept
    assert load_recipe("pretrain-tiny-lit", ["model.text.locked_layers=2"]).model.text.locked_layers == 2


def test_packaged_recipe_values():
    p = load_recipe("pretrain-tiny")
    assert p.objectives == {"vtc": 1.0, "vtm": 1.0, "mlm": {"weight": 1.0, "mask_prob": 0.15}}
    assert (p.train.max_steps, p.train.batch_size, p.train.lr, p.train.schedule) == (150, 32, 3e-4, "cosine")
    assert p.train.lr_mults == {"text": 0.3} and p.eval.rerank_k == 16
    assert load_recipe("retrieval-tiny").objectives == {"vtc": 1.0, "vtm": 1.0}
    assert load_recipe("qa-tiny").train.lr_mults == {"text": 0.3, "qa_head": 3.0}
    assert load_recipe("qa-tiny").objectives is None     # the task's default terms: {qa: 1}


def test_overrides_apply_with_types():
    r = load_recipe("pretrain-tiny", ["train.lr=1e-3", "train.max_steps=7", "data.train=a.json",
                                      "objectives.mlm=0", "eval.rerank_k=0", "model.embed_dim=64"])
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float) and r.train.max_steps == 7
    assert r.data.train == "a.json" and r.objectives["mlm"] == 0 and r.eval.rerank_k == 0
    assert r.model.embed_dim == 64


def test_model_subfield_override_keeps_named_model():
    r = load_recipe("pretrain-tiny", ["model.video.num_layers=2"])
    assert r.model.video.num_layers == 2
    assert (r.model.video.hidden_size, r.model.video.image_size, r.model.text.num_layers) == (192, 64, 2)


def test_model_override_by_name_and_inline_mapping(tmp_path):
    assert load_recipe("pretrain-tiny", ["model=tiny-backbone"]).model.fusion.kind == "backbone"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"task": "retrieval", "model": {"name": "tiny", "embed_dim": 128,
                                                                   "fusion": {"kind": "backbone"}}}))
    r = load_recipe(path)
    assert r.model.embed_dim == 128 and r.model.video.hidden_size == 192
    assert r.model.fusion.kind == "backbone" and r.model.video.fusion_layers == 2   # tiny's fusion.num_layers
    path.write_text(yaml.safe_dump({"model": "tiny"}))
    assert load_recipe(path).model.video.num_frames == 8


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"pretrain-tiny\.train: unknown key 'max_step'; did you mean 'max_steps'\?"):
        load_recipe("pretrain-tiny", ["train.max_step=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'objectivs'; did you mean 'objectives'\?"):
        load_recipe("pretrain-tiny", ["objectivs.vtc=1"])
    with pytest.raises(ConfigError, match=r"model\.video: unknown key 'hiden_size'; did you mean 'hidden_size'\?"):
        load_recipe(None, ["model.video.hiden_size=8"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"pretrain-tiny\.train\.lr: expected a number, got 'abc'"):
        load_recipe("pretrain-tiny", ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got 2\.5"):
        load_recipe("pretrain-tiny", ["train.max_steps=2.5"])
    with pytest.raises(ConfigError, match=r"unknown task 'foo'; tasks: pretrain, retrieval, qa, mc"):
        load_recipe("pretrain-tiny", ["task=foo"])
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1, got 0"):
        load_recipe("pretrain-tiny", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_recipe("pretrain-tiny", ["train.lr"])
    with pytest.raises(ConfigError, match="neither a file nor a packaged recipe; packaged: .*pretrain-tiny"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="'tiny' is a packaged model config, not a recipe"):
        load_recipe("tiny")


@pytest.mark.parametrize("value", [0, -4])
def test_num_frames_zero_or_negative_is_refused_not_taken_as_the_default(value):
    """data.num_frames=0 used to read as "the model's default" and train; only leaving it out means that."""
    with pytest.raises(ConfigError, match=rf"data\.num_frames={value}: must be a positive number of frames"):
        load_recipe("pretrain-tiny", [f"data.num_frames={value}"])
    assert load_recipe("pretrain-tiny").data.num_frames is None
    assert load_recipe("pretrain-tiny", ["data.num_frames=4"]).data.num_frames == 4
    with pytest.raises(ConfigError, match=r"data\.max_text_len=0"):
        load_recipe("pretrain-tiny", ["data.max_text_len=0"])


def test_cli_pretrain_refuses_num_frames_zero_before_training(tmp_path):
    from typer.testing import CliRunner

    from evl.cli import app

    result = CliRunner().invoke(app, ["pretrain", "pretrain-tiny", "data.num_frames=0",
                                      f"train.out_dir={tmp_path / 'run'}"])
    assert result.exit_code != 0 and "data.num_frames=0" in result.output
    assert not (tmp_path / "run").exists()


def test_run_recipe_needs_training_data():
    with pytest.raises(ConfigError, match="data.train is empty"):
        run_recipe(load_recipe(None))


# ---------------------------------------------------------------------------------------- end to end


def tiny_recipe(synthvl, tmp_path, task: str, train: str, test: str, steps: int, model: dict) -> list[str]:
    ann = synthvl / "annotations"
    overrides = [f"task={task}", f"data.train={ann / train}", f"data.test={ann / test}",
                 f"train.max_steps={steps}", "train.batch_size=4", "train.ckpt_every=0", "train.log_every=1",
                 "train.warmup_steps=0", f"train.out_dir={tmp_path / 'run'}", "eval.batch_size=4", "eval.rerank_k=2"]
    return overrides + [f"model={json.dumps(model)}"]


@pytest.fixture(scope="session")
def recipe_model(tiny_model_dict_factory) -> dict:
    return tiny_model_dict_factory("encoder", vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="module")
def pretrain_run(one_torch_thread, synthvl, tmp_path_factory, recipe_model):
    """One 3-step pre-training run (shared by the tests below); returns (out_dir, summary)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "true")
        cfg = load_recipe(None, tiny_recipe(synthvl, tmp, "pretrain", "pretrain.json", "retrieval_test.json", 3,
                                            recipe_model))
        assert cfg.model.video.num_frames == 4 and cfg.model.text.pretrained is None
        return tmp / "run", run_recipe(cfg)


def test_lit_recipe_trains_only_above_the_lock(one_torch_thread, synthvl, tmp_path, recipe_model):
    """A locked text tower leaves training with its weights untouched; the layer above the lock trains."""
    from evl.checkpoint import load_tensors

    model = {**recipe_model, "text": {**recipe_model["text"], "locked_layers": 1}}
    cfg = load_recipe("pretrain-tiny-lit", tiny_recipe(synthvl, tmp_path, "pretrain", "pretrain.json",
                                                       "retrieval_test.json", 3, model)
                      + ["train.precision=fp32", "train.ckpt_every=1"])
    assert cfg.objectives == {"vtc": 1.0} and cfg.model.text.locked_layers == 1
    out = run_recipe(cfg, evaluate=False)
    first = load_tensors(tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors")
    first = {k.removeprefix("model."): v for k, v in first.items()}
    final = load_tensors(Path(out["checkpoint"]) / "model.safetensors")
    locked = [k for k in final if k.startswith(("text.embeddings.", "text.layers.0."))]
    above = [k for k in final if k.startswith("text.layers.1.") and k.endswith("weight")]
    assert locked and all(torch.equal(final[k], first[k]) for k in locked)
    assert above and any(not torch.equal(final[k], first[k]) for k in above)


def test_conv_stem_recipe_trains_the_stem_and_reloads_it(one_torch_thread, synthvl, tmp_path, recipe_model):
    """`model.video.conv_stem` as a recipe override: the stem is trained, saved and read back by evl.load."""
    import evl
    from evl.checkpoint import load_tensors

    model = {**recipe_model, "video": {**recipe_model["video"], "conv_stem": 8}}
    cfg = load_recipe("pretrain-tiny-lit", tiny_recipe(synthvl, tmp_path, "pretrain", "pretrain.json",
                                                       "retrieval_test.json", 2, model)
                      + ["train.precision=fp32", "train.ckpt_every=1"])
    out = run_recipe(cfg, evaluate=False)
    first = load_tensors(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors")
    first = {k.removeprefix("model."): v for k, v in first.items()}
    final = load_tensors(Path(out["checkpoint"]) / "model.safetensors")
    stem = [k for k in final if k.startswith("video.stem.")]
    assert len(stem) == 4 and all(not torch.equal(final[k], first[k]) for k in stem)
    loaded = evl.load(out["checkpoint"])
    assert loaded.model.cfg.video.conv_stem == 8
    assert all(torch.equal(loaded.model.state_dict()[k], final[k]) for k in stem)


def test_dual_residual_stays_zero_under_vtc_and_trains_in_the_qa_fine_tune(one_torch_thread, synthvl, tmp_path,
                                                                             recipe_model):
    """The quickstart's path for `fusion.dual_residual`: VTC pre-training leaves its projection at zero (the
    fusion path never runs), the checkpoint carries it, and the QA fine-tune from that checkpoint trains it."""
    from evl.checkpoint import load_tensors

    model = {**recipe_model, "fusion": {**recipe_model["fusion"], "dual_residual": True}}
    pre = run_recipe(load_recipe("pretrain-tiny-lit", tiny_recipe(synthvl, tmp_path / "pre", "pretrain", "pretrain.json",
                                                                  "retrieval_test.json", 2, model)
                                 + ["train.precision=fp32"]), evaluate=False)
    w = load_tensors(Path(pre["checkpoint"]) / "model.safetensors")
    assert torch.count_nonzero(w["dual_residual.weight"]) == 0
    qa = run_recipe(load_recipe("qa-tiny", tiny_recipe(synthvl, tmp_path / "qa", "qa", "qa_train.json", "qa_test.json",
                                                       2, model) + ["train.precision=fp32"]),
                    init=pre["checkpoint"], evaluate=False)
    w = load_tensors(Path(qa["checkpoint"]) / "model.safetensors")
    assert torch.count_nonzero(w["dual_residual.weight"]) > 0
    assert VideoLanguageModel.from_pretrained(qa["checkpoint"]).cfg.fusion.dual_residual


def test_run_recipe_pretrain_end_to_end(pretrain_run):
    out_dir, summary = pretrain_run
    assert summary["task"] == "pretrain" and summary["steps"] == 3
    assert {"loss", "vtc", "vtm", "mlm"} <= set(summary["final_losses"])
    assert summary["nonfinite_steps"] == 0 and summary["skipped_samples"] == 0
    test = summary["test"]
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "rerank_t2v_r1"):
        assert 0.0 <= test[key] <= 100.0, key
    assert test["t2v_r5"] == 100.0 and test["v2t_r5"] == 100.0   # only 2 test videos: every rank is <= 2
    assert 1.0 <= test["t2v_medr"] <= 2.0
    assert test["num_videos"] == 2 and test["undecodable"] == 0 and test["chance_r1"] == pytest.approx(50.0)
    final = out_dir / "final"
    assert summary["checkpoint"] == str(final)
    assert {"model.safetensors", "config.json"} <= {p.name for p in final.iterdir()}
    assert json.loads((out_dir / "summary.json").read_text())["test"] == test
    loaded = VideoLanguageModel.from_pretrained(final)
    assert loaded.cfg.video.num_frames == 4 and loaded.cfg.fusion.kind == "encoder" and loaded.qa_head is None


def test_run_recipe_qa_end_to_end(synthvl, tmp_path, monkeypatch, recipe_model):
    monkeypatch.setenv("CI", "true")
    cfg = load_recipe(None, tiny_recipe(synthvl, tmp_path, "qa", "qa_train.json", "qa_test.json", 2, recipe_model))
    summary = run_recipe(cfg)
    assert summary["steps"] == 2 and set(summary["final_losses"]) >= {"loss", "qa"}
    final = tmp_path / "run" / "final"
    assert (final / "answers.json").is_file()
    acc = summary["test"]["accuracy"]
    assert isinstance(acc, float) and 0.0 <= acc <= 100.0
    assert summary["test"]["count"] == 12 and "baseline" in summary["test"]
    loaded = VideoLanguageModel.from_pretrained(final)
    assert loaded.qa_head is not None and loaded.cfg.num_answers > 0


def test_final_is_written_whole_or_not_at_all(synthvl, tmp_path, monkeypatch, recipe_model):
    """A failure while final/ is written (disk full on its third file, a kill) leaves no final/ with some
    of its files: it used to be written in place, so a QA model without answers.json could be left."""
    import evl.recipes as R

    monkeypatch.setenv("CI", "true")
    real = R.shutil.copyfile

    def copyfile(src, dst, *a, **k):
        if Path(dst).name == "tokenizer.json" and "step_" not in str(dst):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(R.shutil, "copyfile", copyfile)
    cfg = load_recipe(None, tiny_recipe(synthvl, tmp_path, "qa", "qa_train.json", "qa_test.json", 1, recipe_model))
    with pytest.raises(OSError, match="No space left"):
        run_recipe(cfg)
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(R.shutil, "copyfile", real)
    cfg = load_recipe(None, tiny_recipe(synthvl, tmp_path, "qa", "qa_train.json", "qa_test.json", 1, recipe_model)
                      + ["train.overwrite=true"])
    run_recipe(cfg, evaluate=False)
    assert {"model.safetensors", "config.json", "tokenizer.json", "answers.json"} <= {p.name for p in (run / "final").iterdir()}


def test_a_step_checkpoint_has_its_tokenizer_before_latest_points_at_it(synthvl, tmp_path, monkeypatch, recipe_model):
    """latest.json is what --resume and evaluation read: the folder it names must already be whole."""
    import evl.train.state as S

    monkeypatch.setenv("CI", "true")
    real = S.atomic_write_json
    pointed: list[str] = []

    def write_json(path, obj):
        if Path(path).name == S.LATEST:
            folder = Path(path).parent / obj["dir"]
            assert (folder / "tokenizer.json").is_file(), f"latest.json would point at {folder} without its tokenizer"
            pointed.append(obj["dir"])
        return real(path, obj)

    monkeypatch.setattr(S, "atomic_write_json", write_json)
    cfg = load_recipe(None, tiny_recipe(synthvl, tmp_path, "pretrain", "pretrain.json", "retrieval_test.json", 2,
                                        recipe_model) + ["train.ckpt_every=1"])
    run_recipe(cfg, evaluate=False)
    assert pointed == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize("task,train,test", [("retrieval", "retrieval_train.json", "retrieval_test.json"),
                                             ("mc", "mc_train.json", "mc_test.json"),
                                             ("qa", "qa_train.json", "qa_test.json")])
def test_finetune_from_checkpoint_uses_its_architecture(pretrain_run, synthvl, tmp_path, monkeypatch, task, train,
                                                        test, recipe_model):
    monkeypatch.setenv("CI", "true")
    overrides = tiny_recipe(synthvl, tmp_path, task, train, test, 1, recipe_model)[:-1]   # no model= override
    cfg = load_recipe(None, overrides)   # no objectives: the task's default terms
    assert cfg.model.video.image_size == 224          # the recipe's (default) model ...
    summary = run_recipe(cfg, init=pretrain_run[0] / "final")
    final = VideoLanguageModel.from_pretrained(tmp_path / "run" / "final")
    assert final.cfg.video.image_size == 32           # ... loses to the checkpoint's architecture
    assert summary["steps"] == 1
    if task == "mc":
        assert summary["test"]["chance"] == pytest.approx(20.0) and summary["test"]["count"] == 2
    if task == "qa":
        assert final.qa_head is not None and (tmp_path / "run" / "final" / "answers.json").is_file()
    if task == "retrieval":
        assert {"loss", "vtc", "vtm"} == set(summary["final_losses"]) - {"temperature", "lr", "grad_norm"}


def test_run_recipe_rejects_vocab_smaller_than_tokenizer(synthvl, tmp_path, monkeypatch, tiny_model_dict_factory):
    monkeypatch.setenv("CI", "true")
    cfg = load_recipe(None, tiny_recipe(synthvl, tmp_path, "pretrain", "pretrain.json", "retrieval_test.json", 1,
                                        tiny_model_dict_factory("encoder", vocab_size=100)))
    with pytest.raises(ConfigError, match="vocab_size=100; set model.text.vocab_size=30522"):
        run_recipe(cfg)


@pytest.mark.parametrize("kind", ["encoder", "backbone"])
def test_retrieval_eval_does_not_depend_on_batch_size(synthvl, tiny_model_dict_factory, kind):
    """Features of several batches are concatenated (text padded to the longest batch) before the
    dual ranking and the fusion re-ranking; the metrics must equal those of a single batch."""
    import torch

    from evl.config import from_dict
    from evl.data.text import Tokenizer
    from evl.models.model import ModelConfig
    from evl.recipes import evaluate_checkpoint_model
    from evl.tasks.evaluate import EvalSettings

    torch.manual_seed(0)
    model = VideoLanguageModel(from_dict(ModelConfig, tiny_model_dict_factory(kind, vocab_size=TOKENIZER_VOCAB)))
    tok = Tokenizer.from_pretrained("minilm")
    ann = synthvl / "annotations" / "retrieval_train.json"
    one, many = (evaluate_checkpoint_model(model, "retrieval", ann, None, tok, EvalSettings(batch_size=b, rerank_k=4))
                 for b in (64, 2))
    assert one["num_videos"] == 9 and one["rerank_rerank_k"] == 4
    assert one == pytest.approx(many)


def _probe_batch(seed: int):
    import torch

    b, t, length = 4, 4, 8
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1 + seed % 3] = ids[:, 1 + seed % 3]
    return {"frames": torch.randn(b, t, 3, 32, 32, generator=g), "frame_mask": None,
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_input_ids": ids, "mlm_labels": labels,
            "answer_ids": torch.tensor([0, 1, 2, 0]), "verbs": [[]] * b, "nouns": [[]] * b,
            "option_ids": ids[:, None].expand(b, 2, length), "option_mask": torch.ones(b, 2, length, dtype=torch.long),
            "answer_index": torch.tensor([0, 1, 0, 1])}


MIXES = [{"vtc": 1}, {"vtc": 1, "vtm": 1}, {"vtc": 1, "vtm": 1, "mlm": 1}, {"qa": 1}, {"mc": 1}, {"mlm": 1},
         {"vtm": 1}, {"egonce": 1}, {"vtc": 1, "mlm": 1}, {"egonce": 1, "mlm": 1}]


@pytest.mark.parametrize("kind", ["encoder", "backbone"])
def test_probe_freezes_exactly_the_parameters_without_gradient(tiny_model_dict_factory, kind):
    """The probe (one forward/backward) must freeze what a mix leaves without gradient and nothing
    else — DDP stalls on a trainable parameter that gets no gradient, and freezing a used one stops
    learning — checked on a *different* batch than the probe's. It must leave no trace (weights and
    RNG as before). Backbone fusion with VTC + MLM and no VTM is the case name rules got wrong: the
    last video block's cross-attention feeds nothing MLM reads."""
    import torch

    from evl.models.model import build_model
    from evl.train.objective import TrainObjective
    from evl.train.probe import freeze_gradient_free

    for mix in MIXES:
        torch.manual_seed(0)
        model = build_model(tiny_model_dict_factory(kind, vocab_size=100))
        model.set_num_answers(3)
        obj = TrainObjective.from_spec(model, mix)
        before = {k: v.clone() for k, v in obj.state_dict().items()}
        rng = torch.random.get_rng_state()
        frozen = freeze_gradient_free(obj, lambda obj=obj: obj(_probe_batch(0))["loss"])
        assert torch.equal(torch.random.get_rng_state(), rng)
        assert all(torch.equal(v, before[k]) for k, v in obj.state_dict().items())
        assert all(p.grad is None for p in obj.parameters())
        obj(_probe_batch(1))["loss"].backward()
        for name, p in obj.named_parameters():
            assert (p.grad is None) == (name in frozen) == (not p.requires_grad), (kind, mix, name)
        heads = {n.split(".")[1] for n in frozen if n.split(".")[1].endswith("_head")}
        assert ("mlm_head" in heads) == ("mlm" not in mix), (kind, mix)
        assert ("qa_head" in heads) == ("qa" not in mix), (kind, mix)
        if kind == "backbone" and mix == {"vtc": 1, "mlm": 1}:
            assert any(n.startswith("model.video.blocks.1.cross_attn.") for n in frozen)
            assert not any(n.startswith("model.text.layers.1.cross_attn.") for n in frozen)


def test_multiple_choice_options_carry_the_question(tmp_path):
    """NExT-QA-style MC scores "question + option"; caption MC (SynthVL, MSRVTT-MC) the option alone."""
    import numpy as np

    from evl.data.annotations import Record
    from evl.data.datasets import ClipSettings, VideoTextDataset
    from evl.data.video_writer import write_video

    write_video(tmp_path / "v.mp4", np.zeros((4, 32, 32, 3), dtype=np.uint8))
    qa = Record(video="v.mp4", question="what did the man do?", options=["ran", "sat"], answer_index=1)
    cap = Record(video="v.mp4", options=["a man runs", "a man sits"], answer_index=0)
    ds = VideoTextDataset([qa, cap], tmp_path, ClipSettings(num_frames=4, size=32), text="none")
    assert ds[0]["options"] == ["what did the man do? ran", "what did the man do? sat"]
    assert ds[1]["options"] == ["a man runs", "a man sits"]


def test_bad_video_is_replaced_and_counted(tmp_path):
    """Training datasets swap an undecodable sample for a decodable one (batch sizes stay equal across
    ranks) and mark it, so the Trainer's collate counts it as skipped."""
    import numpy as np

    from evl.data.annotations import Record
    from evl.data.datasets import ClipSettings, VideoTextDataset
    from evl.data.video_writer import write_video
    from evl.train.data import skip_none_collate

    write_video(tmp_path / "good.mp4", np.zeros((4, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "bad.mp4").write_text("not a video")
    recs = [Record(video="bad.mp4", captions=["x"]), Record(video="good.mp4", captions=["y"])]
    strict = VideoTextDataset(recs, tmp_path, ClipSettings(num_frames=4, size=32), replace_bad=0)
    assert strict[0] is None
    ds = VideoTextDataset(recs, tmp_path, ClipSettings(num_frames=4, size=32), replace_bad=2)
    s0, s1 = ds[0], ds[1]
    assert s0["video_name"] == "good.mp4" and s0["replaced_bad"] == 1 and s1["replaced_bad"] == 0
    collated = skip_none_collate(lambda xs: len(xs))([s0, s1, None])
    assert collated.batch == 2 and collated.skipped == 2    # one replaced + one None


def test_init_reports_recipe_model_settings_it_ignores():
    """With --init the checkpoint's architecture wins; the differing recipe keys are named in a warning."""
    from evl.recipes import _model_differences

    tiny = load_recipe("pretrain-tiny").model
    same = load_recipe("pretrain-tiny").model
    backbone = load_recipe("pretrain-tiny", ["model=tiny-backbone"]).model
    deeper = load_recipe("pretrain-tiny", ["model.video.num_layers=3", "model.text.pretrained=null"]).model
    assert _model_differences(tiny, same) == []
    assert "fusion.kind" in _model_differences(tiny, backbone)
    assert _model_differences(tiny, deeper) == ["video.num_layers"]     # the weights source is not architecture
