"""`evl.load` (the Python API), `evl export` (ONNX fp32 + int8) and the README's example, on tiny models."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import evl
from cli_checks import error_line, invoke
from evl.errors import CheckpointError, ConfigError, EvlError
from needs import module

ROOT = Path(__file__).resolve().parents[1]
INT8_MIN_COSINE = 0.98     # int8 embeddings vs eager fp32, per clip / text (the stated tolerance)


def _videos(synthvl: Path) -> list[Path]:
    return sorted((synthvl / "videos").glob("*.mp4"))


@pytest.fixture(scope="module")
def qa_checkpoint(one_torch_thread, synthvl, tmp_path_factory, tiny_model_dict_factory) -> Path:
    """A tiny fusion model fine-tuned 2 steps on SynthVL's open-ended QA (what `evl finetune qa-tiny` writes)."""
    from evl.recipes import load_recipe, run_recipe

    tmp = tmp_path_factory.mktemp("qa")
    ann = synthvl / "annotations"
    model = tiny_model_dict_factory("encoder", vocab_size=30522)
    cfg = load_recipe(None, ["task=qa", f"data.train={ann / 'qa_train.json'}", f"data.test={ann / 'qa_test.json'}",
                             "train.max_steps=2", "train.batch_size=4", "train.ckpt_every=0", "train.warmup_steps=0",
                             f"train.out_dir={tmp / 'run'}", "train.precision=fp32", f"model={json.dumps(model)}"])
    run_recipe(cfg, evaluate=False)
    return tmp / "run" / "final"


@pytest.fixture(scope="module")
def exported(one_torch_thread, trained, tmp_path_factory) -> Path:
    module("onnxruntime", "pip install -e '.[dev]' (or pip install onnxruntime)")
    module("onnx", "pip install -e '.[dev]' (or pip install onnx)")
    out = tmp_path_factory.mktemp("export") / "onnx"
    result = invoke(["export", str(trained[0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------- torch


def test_dual_embeddings_are_the_evaluation_paths(one_torch_thread, trained, synthvl):
    from evl.data.annotations import Record
    from evl.tasks.evaluate import EvalSettings, embed_clips, embed_texts

    final, caps = trained
    model = evl.load(final)
    assert model.kind == "fusion" and model.backend == "torch" and model.can("match") and not model.can("answer")
    videos = _videos(synthvl)
    emb = model.encode_video(videos, batch_size=5)
    assert emb.shape == (12, model.model.cfg.embed_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(12), atol=1e-5)
    ref = embed_clips(model.model, [Record(video=str(v)) for v in videos], None, EvalSettings(device="cpu"))
    assert torch.allclose(emb, ref.emb, atol=1e-6)
    texts = [caps[v.name][0] for v in videos]
    t = model.encode_text(texts, batch_size=5)
    assert torch.allclose(t, embed_texts(model.model, texts, model.tokenizer, EvalSettings(device="cpu")).emb, atol=1e-6)
    # the trained model finds most clips from their held-out caption
    sims = model.similarity(t, emb)
    assert sims.shape == (12, 12) and (sims.argmax(dim=1) == torch.arange(12)).float().mean() >= 0.5
    # preprocessed frames give the same embeddings as the files; a window is a clip of its own
    frames, masks = zip(*(model.preprocess(v) for v in videos[:3]), strict=True)
    assert frames[0].shape == (model.num_frames, 3, model.image_size, model.image_size)
    assert torch.allclose(model.encode_video(torch.stack(frames), torch.stack(masks)), emb[:3], atol=1e-6)
    window = model.encode_video([(videos[0], 0.0, 0.5)])
    assert window.shape == (1, emb.shape[1]) and not torch.allclose(window[0], emb[0])
    assert torch.allclose(model.encode_video((videos[0], 0.0, 0.5)), window)      # one window alone
    import numpy as np

    assert torch.allclose(model.encode_video((videos[0], np.float32(0.0), np.float64(0.5))), window)
    assert torch.allclose(model.encode_video(tuple(videos[:3])), emb[:3], atol=1e-6)   # a tuple of files
    with pytest.raises(ConfigError, match=r"\(file, start seconds, end seconds\)"):
        model.preprocess((videos[0], "soon", 2))


def test_a_dual_only_checkpoint_encodes_and_refuses_fusion(one_torch_thread, tiny_model_dict_factory, synthvl, tmp_path):
    from evl.models.model import build_model

    torch.manual_seed(0)
    net = build_model(tiny_model_dict_factory("none", vocab_size=30522))
    net.save_pretrained(tmp_path / "dual")
    model = evl.load(tmp_path / "dual")
    assert model.kind == "dual" and repr(model).startswith("EvlModel(kind='dual'")
    assert [a for a in ("encode_video", "encode_text", "similarity", "match", "answer") if model.can(a)] == [
        "encode_video", "encode_text", "similarity"]
    videos = _videos(synthvl)[:2]
    frames, mask = model.preprocess(videos[0])
    with torch.no_grad():
        ref = net.eval().encode_video(frames[None], None if bool(mask.all()) else mask[None])
    assert torch.allclose(model.encode_video(videos[0]), ref, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot match: that needs a checkpoint with a fusion part"):
        model.match(videos[0], "a red circle")


def test_match_gives_a_probability_per_text(one_torch_thread, trained, synthvl):
    final, caps = trained
    model = evl.load(final)
    video = _videos(synthvl)[0]
    p = model.match(video, [caps[video.name][0], "a cyan star", "a red square moves up"])
    assert p.shape == (3,) and bool(((p >= 0) & (p <= 1)).all())


def test_answer_on_a_qa_checkpoint(one_torch_thread, qa_checkpoint, synthvl):
    model = evl.load(qa_checkpoint)
    assert model.kind == "qa" and model.can("answer")
    with pytest.raises(ConfigError, match="question is empty"):
        model.answer(_videos(synthvl)[0], "  ")
    out = model.answer(_videos(synthvl)[0], "what colour is the square?", top=3)
    assert out.answer in model.vocab.answers and 0 < out.score <= 1
    assert len(out.alternatives) == 2 and all(s <= out.score for _, s in out.alternatives) and out.frames is None
    cli = json.loads(invoke(["ask", str(_videos(synthvl)[0]), "what colour is the square?", "--model",
                             str(qa_checkpoint), "--top", "3", "--json"]).output)
    assert cli["answer"] == out.answer and cli["score"] == pytest.approx(out.score, abs=1e-4)


def test_what_a_model_cannot_do_is_a_clear_error(one_torch_thread, trained, synthvl, tmp_path):
    final, _ = trained
    model = evl.load(final)
    video = _videos(synthvl)[0]
    with pytest.raises(ConfigError, match=r"'fusion' model .* cannot answer: that needs a QA checkpoint"):
        model.answer(video, "what colour is the square?")
    with pytest.raises(ConfigError, match=r"\(N, T, 3, S, S\)"):
        model.encode_video(torch.zeros(4, 3, 32, 32))
    with pytest.raises(ConfigError, match="N >= 1"):
        model.encode_video(torch.zeros(0, 4, 3, 32, 32))
    with pytest.raises(EvlError, match="nope.mp4"):
        model.encode_video([video, tmp_path / "nope.mp4"])
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        model.encode_text([])
    with pytest.raises(ConfigError, match="of one width"):
        model.similarity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(CheckpointError, match="no config.json"):
        evl.load(tmp_path)
    with pytest.raises(ConfigError, match="backend 'tensorrt' is not one of"):
        evl.load(final, backend="tensorrt")
    with pytest.raises(ConfigError, match=r"evl export .* --format onnx --out DIR"):
        evl.load(final, backend="onnx")
    assert "cannot answer" in error_line(invoke(["ask", str(video), "what?", "--model", str(final)]))
    odd = error_line(invoke(["eval", str(final), "--task", "retrieval", "--frames", "3", "--data",
                             str(synthvl / "annotations" / "retrieval_test.json")]))
    assert "--frames 3: must be a multiple of the model's tubelet size (2 frames" in odd


# ------------------------------------------------------------------------------------------- ONNX


def test_onnx_export_matches_pytorch_and_int8_stays_close(exported, trained, synthvl):
    final, caps = trained
    info = json.loads((exported / "export.json").read_text())
    assert info["parity"]["video"]["fp32_max_abs_diff"] <= 1e-4 and info["parity"]["text"]["fp32_max_abs_diff"] <= 1e-4
    eager = evl.load(final)
    fp32, int8 = evl.load(exported), evl.load(exported, backend="onnx-int8", threads=1)
    assert fp32.kind == "onnx" and fp32.backend == "onnx" and int8.backend == "onnx-int8" and not fp32.can("answer")
    videos = _videos(synthvl)
    texts = [caps[v.name][0] for v in videos]
    ref_v, ref_t = eager.encode_video(videos), eager.encode_text(texts)
    for batch in (1, 5, 12):   # dynamic batch
        assert (fp32.encode_video(videos, batch_size=batch) - ref_v).abs().max() <= 1e-4
        assert (fp32.encode_text(texts, batch_size=batch) - ref_t).abs().max() <= 1e-4
    q_v, q_t = int8.encode_video(videos), int8.encode_text(texts)
    assert torch.nn.functional.cosine_similarity(q_v, ref_v).min() >= INT8_MIN_COSINE
    assert torch.nn.functional.cosine_similarity(q_t, ref_t).min() >= INT8_MIN_COSINE
    with pytest.raises(ConfigError, match="cannot match"):
        fp32.match(videos[0], "a red circle")
    with pytest.raises(ConfigError, match="is an ONNX export"):
        evl.load(exported, backend="torch")
    with pytest.raises(ConfigError, match="this export reads 4 frames per clip, the tensor has 2"):
        fp32.encode_video(torch.zeros(1, 2, 3, 32, 32))


def test_a_stem_and_dual_residual_checkpoint_exports_and_matches(one_torch_thread, tiny_model_dict_factory, synthvl,
                                                                 tmp_path):
    """The quickstart's architecture (conv stem, channels-last inside; fusion.dual_residual) through evl.load,
    `match` and `evl export`: ONNX fp32 equals eager within 1e-4."""
    module("onnxruntime", "pip install -e '.[dev]' (or pip install onnxruntime)")
    from evl.models.model import build_model

    d = tiny_model_dict_factory("encoder", vocab_size=30522)
    d["video"]["conv_stem"], d["fusion"]["dual_residual"] = 8, True
    torch.manual_seed(0)
    net = build_model(d)
    with torch.no_grad():
        net.dual_residual.weight.normal_()
    net.save_pretrained(tmp_path / "ck")
    eager = evl.load(tmp_path / "ck")
    assert eager.kind == "fusion" and eager.model.cfg.fusion.dual_residual and eager.model.cfg.video.conv_stem == 8
    videos = _videos(synthvl)[:3]
    p = eager.match(videos[0], ["a red circle", "a blue square"])
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())
    result = invoke(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "onnx"), "--no-int8"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["parity"]["video"]["fp32_max_abs_diff"] <= 1e-4
    onnx = evl.load(tmp_path / "onnx")
    assert (onnx.encode_video(videos) - eager.encode_video(videos)).abs().max() <= 1e-4


def test_index_and_search_run_on_the_exported_encoders(exported, trained, synthvl, tmp_path):
    final, caps = trained
    video = _videos(synthvl)[3]
    query = caps[video.name][0]
    torch_idx, onnx_idx = tmp_path / "t", tmp_path / "o"
    assert invoke(["index", str(synthvl / "videos"), "--model", str(final), "--out", str(torch_idx)]).exit_code == 0
    built = invoke(["index", str(synthvl / "videos"), "--model", str(exported), "--backend", "onnx-int8",
                    "--out", str(onnx_idx), "--json"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.output)["items"] == 12
    # the export is the same model: an index built with PyTorch answers ONNX queries and vice versa
    for index, model, backend in ((torch_idx, exported, "onnx"), (onnx_idx, final, "torch"), (onnx_idx, exported, "onnx-int8")):
        out = invoke(["search", str(index), query, "-k", "3", "--model", str(model), "--backend", backend, "--json"])
        assert out.exit_code == 0, out.output
        assert len(json.loads(out.output)) == 3
    same = [json.loads(invoke(["search", str(torch_idx), query, "-k", "12", "--json", *extra]).output)
            for extra in ([], ["--model", str(exported), "--backend", "onnx"])]
    assert [h["path"] for h in same[0]] == [h["path"] for h in same[1]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(*same, strict=True)) <= 1e-4
    assert "not exported" in error_line(invoke(["search", str(torch_idx), query, "--rerank", "4", "--model",
                                                str(exported), "--backend", "onnx"]))


def test_a_re_export_leaves_nothing_stale_and_indexes_do_not_mix_frame_counts(exported, trained, synthvl, tmp_path):
    final, caps = trained
    out = tmp_path / "again"
    assert invoke(["export", str(final), "--out", str(out)]).exit_code == 0
    assert invoke(["export", str(final), "--out", str(out), "--no-int8", "--frames", "2"]).exit_code == 0
    assert not list(out.glob("*.int8.onnx")) and json.loads((out / "export.json").read_text())["num_frames"] == 2
    with pytest.raises(CheckpointError, match="no video.int8.onnx"):
        evl.load(out, backend="onnx-int8")
    assert "ONNX export" in error_line(invoke(["eval", str(out), "--task", "retrieval", "--data",
                                               str(synthvl / "annotations" / "retrieval_test.json")]))
    idx = tmp_path / "idx"
    assert invoke(["index", str(synthvl / "videos"), "--model", str(exported), "--backend", "onnx-int8",
                   "--out", str(idx)]).exit_code == 0
    from evl.search.query import SearchIndex

    assert SearchIndex(idx)._current().model.backend == "onnx-int8"    # queries default to what built the index
    assert "reads 2" in error_line(invoke(["index", str(synthvl / "videos"), "--model", str(out), "--out", str(idx)]))


def test_export_refuses_what_it_cannot_export(trained, tmp_path):
    module("onnxruntime", "pip install -e '.[dev]' (or pip install onnxruntime)")
    final, _ = trained
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "not an evl export" in error_line(invoke(["export", str(final), "--out", str(tmp_path / "busy")]))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert "no config.json" in error_line(invoke(["export", str(tmp_path), "--out", str(tmp_path / "x")]))
    assert "'onnx'" in error_line(invoke(["export", str(final), "--out", str(tmp_path / "y"), "--format", "tflite"]))


# ------------------------------------------------------------------------------------------- README


def test_readme_python_example_runs(one_torch_thread, trained, qa_checkpoint, synthvl, tmp_path):
    """The README's `evl.load` example, run as written against a quickstart-shaped folder."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its `<!-- api-example -->` Python block"
    qs = tmp_path / "runs" / "quickstart"
    for name, target in (("retrieval/final", trained[0]), ("qa/final", qa_checkpoint), ("synthvl/videos", synthvl / "videos")):
        (qs / name).parent.mkdir(parents=True, exist_ok=True)
        (qs / name).symlink_to(target, target_is_directory=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block.group(1), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
