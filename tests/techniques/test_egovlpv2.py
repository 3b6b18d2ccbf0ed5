"""EgoVLPv2: EgoNCE positives from metadata, hard-negative VTM (and its easy warm-up), content-word MLM,
one checkpoint in dual and fusion mode, and the packaged recipe end to end (`evl pretrain` → `evl eval`)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from evl.cli import app
from evl.data.text import FUNCTION_WORDS, Tokenizer, function_word_ids, mask_tokens
from evl.errors import ConfigError
from evl.losses.functional import egonce_positive_mask
from evl.losses.registry import build_terms
from evl.losses.terms import MaskTokens, TermContext
from evl.models.model import VideoLanguageModel
from evl.recipes import load_recipe
from evl.train.objective import TrainObjective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


# ------------------------------------------------------------------------------------------ EgoNCE


def test_egonce_positives_any_and_all_from_tags():
    verbs = [["roll"], ["roll", "spin"], ["roll"], ["spin"], []]
    nouns = [["ball"], ["ball", "cube"], ["ball"], ["ball"], []]
    any_ = egonce_positive_mask(verbs, nouns, match="any")
    all_ = egonce_positive_mask(verbs, nouns, match="all")
    # any (EgoVLP): 0, 1, 2 share roll+ball; 1 and 3 share spin+ball
    expected_any = {(0, 1), (0, 2), (1, 2), (1, 3)}
    # all: only clips with identical verb and noun sets (0 and 2); untagged clips match nothing
    expected_all = {(0, 2)}
    for mask, expected in ((any_, expected_any), (all_, expected_all)):
        assert mask.diagonal().all() and torch.equal(mask, mask.T)
        off = {(i, j) for i in range(5) for j in range(i + 1, 5) if mask[i, j]}
        assert off == expected
    with pytest.raises(ValueError, match="match must be 'any' or 'all'"):
        egonce_positive_mask(verbs, nouns, match="some")


def test_egonce_term_reads_tags_from_the_batch_and_validates_match(tiny_model_config):
    model = VideoLanguageModel(tiny_model_config("backbone"))
    ctx = TermContext(model_cfg=model.cfg)
    terms, _ = build_terms({"egonce": {"weight": 1.0, "match": "any"}, "vtm": 2.0}, ctx)
    assert ctx.positives == ("clip_positives", "tag_positives")   # VTM excludes EgoNCE's positives
    with pytest.raises(ConfigError, match="match must be 'any' or 'all'"):
        build_terms({"egonce": {"match": "most"}}, TermContext(model_cfg=model.cfg))
    objective = TrainObjective.from_spec(model, {"egonce": {"weight": 1.0, "match": "all"}})
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.randn(4, 4, 3, 32, 32, generator=g), "frame_mask": None,
             "input_ids": torch.randint(1, 100, (4, 6), generator=g), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "verbs": [["roll"], ["roll"], ["roll", "spin"], []], "nouns": [["ball"], ["ball"], ["ball"], []],
             "clip_keys": ["a", "b", "c", "d"]}
    from evl.losses.step import StepCache

    step = StepCache(model, batch, objective._features, list(objective.terms.values()))
    mask = step["tag_positives"]
    assert mask[0, 1] and not mask[0, 2] and not mask[2, 3] and mask.diagonal().all()


# ------------------------------------------------------------------------------------------ VTM


@pytest.mark.parametrize("progress", [0.1, 0.9])
def test_vtm_never_draws_a_positive_as_negative(tiny_model_config, monkeypatch, progress):
    """Over many draws, in the easy warm-up (uniform) and after it (softmax of similarity), no pair that
    is the same clip or an EgoNCE positive is ever paired as a VTM negative; in the warm-up every
    allowed negative is drawn."""
    import evl.losses.terms as terms

    drawn = []
    real = terms.build_vtm_pairs

    def spy(b, negatives):
        drawn.append((negatives.text_for_video.clone(), negatives.video_for_text.clone()))
        return real(b, negatives)

    monkeypatch.setattr(terms, "build_vtm_pairs", spy)
    torch.manual_seed(0)
    model = VideoLanguageModel(tiny_model_config("backbone"))
    objective = TrainObjective.from_spec(model, {"egonce": 1.0, "vtm": {"weight": 2.0, "easy_warmup": 0.5}})
    g = torch.Generator().manual_seed(1)
    # clips 0 and 1 show the same clip key; 2 and 3 have equal tags; 4 and 5 are unrelated
    batch = {"frames": torch.randn(6, 4, 3, 32, 32, generator=g), "frame_mask": None,
             "input_ids": torch.randint(1, 100, (6, 6), generator=g), "attention_mask": torch.ones(6, 6, dtype=torch.long),
             "verbs": [["a"], ["b"], ["roll"], ["roll"], ["c"], ["d"]],
             "nouns": [["x"], ["y"], ["ball"], ["ball"], ["z"], ["w"]],
             "clip_keys": ["k0", "k0", "k2", "k3", "k4", "k5"], "train_progress": progress}
    with torch.no_grad():
        for _ in range(40):
            objective(batch)
    positives = {(0, 1), (1, 0), (2, 3), (3, 2)} | {(i, i) for i in range(6)}
    pairs = {(i, int(t)) for t4v, _ in drawn for i, t in enumerate(t4v)}
    pairs |= {(int(v), j) for _, v4t in drawn for j, v in enumerate(v4t)}
    assert not pairs & positives
    if progress < 0.5:   # uniform: all 26 allowed (video, text) pairs show up in 80 draws per anchor
        assert len(pairs) == 36 - len(positives)


def test_vtm_easy_warmup_is_validated(tiny_model_config):
    model = VideoLanguageModel(tiny_model_config("backbone"))
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="easy_warmup"):
            build_terms({"vtm": {"easy_warmup": bad}}, TermContext(model_cfg=model.cfg))


# ------------------------------------------------------------------------------------------ MLM


def test_function_words_are_never_masked():
    tok = Tokenizer.from_pretrained("minilm")
    skip = function_word_ids(tok)
    assert len(skip) == len(FUNCTION_WORDS) - 1   # every function word is one WordPiece except "it's"
    text = tok(["the red circle moves up and then a blue square spins"])
    words = tok.encode_words(["red", "circle", "moves", "blue", "square", "spins"])
    for seed in range(20):
        m = mask_tokens(text.input_ids, text.attention_mask, tok, prob=0.5,
                        generator=torch.Generator().manual_seed(seed), unmaskable=skip)
        chosen = text.input_ids[m.labels != -100].tolist()
        assert chosen and set(chosen) <= set(words)


def test_mlm_term_option_reaches_the_batch_transform():
    from evl.config import from_dict
    from evl.models.model import ModelConfig

    tok = Tokenizer.from_pretrained("minilm")
    cfg = from_dict(ModelConfig, {"text": {"pretrained": None, "num_layers": 1}, "fusion": {"kind": "backbone", "num_layers": 1},
                                  "video": {"num_layers": 1}}, where="model")
    terms, _ = build_terms({"mlm": {"mask_prob": 0.3, "skip_function_words": True}}, TermContext(cfg, tok))
    (transform,) = terms["mlm"].batch_transforms()
    assert isinstance(transform, MaskTokens) and transform.unmaskable == function_word_ids(tok)
    plain, _ = build_terms({"mlm": 1.0}, TermContext(cfg, tok))
    assert plain["mlm"].batch_transforms()[0].unmaskable == frozenset()
    with pytest.raises(ConfigError, match="skip_function_words"):
        build_terms({"mlm": {"skip_function_words": "maybe"}}, TermContext(cfg, tok))
    # options go through the config coercer like every other option: "yes" is true, as in train.overwrite=yes
    assert build_terms({"mlm": {"skip_function_words": "yes"}}, TermContext(cfg, tok))[0]["mlm"].skip_function_words


# ------------------------------------------------------------------------------------------ one checkpoint, two modes


def test_switching_modes_on_a_loaded_checkpoint_changes_no_weight(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    model = VideoLanguageModel(tiny_model_config("backbone"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate"):
                p.fill_(0.7)   # a trained model: fusion on differs from fusion off
    model.save_pretrained(tmp_path / "ck")
    loaded = VideoLanguageModel.from_pretrained(tmp_path / "ck").eval()
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    frames, ids = torch.randn(3, 4, 3, 32, 32, generator=g), torch.randint(1, 100, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        v0, t0 = loaded.encode_video(frames), loaded.encode_text(ids, mask)          # dual
        vf, tf = loaded.video_features(frames), loaded.text_features(ids, mask)
        fused = loaded.fuse(vf, tf)                                                 # fusion
        loaded.score_pairs(vf, tf)
        v1, t1 = loaded.encode_video(frames), loaded.encode_text(ids, mask)          # dual again
    after = loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(v0, v1) and torch.equal(t0, t1)
    assert not torch.allclose(fused.text_tokens, tf.tokens)   # the fusion mode did fuse


def test_fused_model_at_init_equals_the_unimodal_towers(tiny_model_config):
    """Gates start at 0: the fusion pass gives exactly the towers' own outputs, so the fused pooled
    vector is [dual video pooling, dual text mean pooling]."""
    torch.manual_seed(0)
    model = VideoLanguageModel(tiny_model_config("backbone")).eval()
    assert all(float(p.detach()) == 0.0 for n, p in model.named_parameters() if n.endswith(".gate"))
    g = torch.Generator().manual_seed(3)
    frames, ids = torch.randn(2, 4, 3, 32, 32, generator=g), torch.randint(1, 100, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        vf, tf = model.video_features(frames), model.text_features(ids, mask)
        fused = model.fuse(vf, tf)
        assert torch.equal(fused.text_tokens, tf.tokens)
        text_mean = (tf.tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert torch.allclose(fused.pooled, torch.cat([model.video.pool(vf.tokens, vf.token_mask), text_mean], -1))


# ------------------------------------------------------------------------------------------ the recipe


def test_egovlpv2_recipes_load():
    tiny = load_recipe("egovlpv2-tiny")
    assert tiny.model.fusion.kind == "backbone"
    # fusion in the top half of both towers
    assert tiny.model.fusion.num_layers * 2 == tiny.model.video.num_layers == tiny.model.text.num_layers
    assert tiny.objectives["egonce"]["weight"] == 1.0 and tiny.objectives["vtm"]["weight"] == 2.0
    assert tiny.objectives["mlm"]["weight"] == 1.0
    assert tiny.train.lr_mults["*cross_attn"] == 4.0 and tiny.train.lr_mults["*_head"] == 4.0
    assert tiny.data.num_frames < tiny.model.video.num_frames   # fewer frames in pre-training
    small = load_recipe("egovlpv2-small")
    assert small.model.fusion.kind == "backbone"
    assert small.model.fusion.num_layers * 2 == small.model.video.num_layers == small.model.text.num_layers
    assert (small.data.num_frames, small.model.video.num_frames) == (4, 16)


def test_pretrain_with_the_egovlpv2_recipe_then_eval_rerank_and_mc(synthvl, tmp_path):
    ann = synthvl / "annotations"
    pre = runner.invoke(app, ["pretrain", "egovlpv2-tiny", f"data.train={ann / 'pretrain.json'}",
                              f"data.videos={synthvl / 'videos'}", f"train.out_dir={tmp_path / 'run'}",
                              "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=1", "--no-eval"])
    assert pre.exit_code == 0, pre.output
    final = tmp_path / "run" / "final"
    cfg = json.loads((final / "config.json").read_text())["model"]
    assert cfg["fusion"]["kind"] == "backbone" and cfg["video"]["num_frames"] == 8   # evaluation frames
    ret = runner.invoke(app, ["eval", str(final), "--task", "retrieval", "--data", str(ann / "retrieval_test.json"),
                              "--rerank-k", "2", "--json"])
    assert ret.exit_code == 0, ret.output
    r = json.loads(ret.output[ret.output.index("{"):])
    for key in ("t2v_r1", "rerank_t2v_r1", "ensemble_t2v_r1"):
        assert 0.0 <= r[key] <= 100.0
    assert r["rerank_rerank_k"] == 2
    # re-ranking only re-orders the dual top 2: beyond rank 2 its recall is the shortlist's
    assert r["rerank_t2v_r5"] == r["rerank_t2v_r10"] == r["rerank_t2v_in_topk"] >= r["t2v_r1"]
    mc = runner.invoke(app, ["eval", str(final), "--task", "mc", "--data", str(ann / "mc_test.json"), "--json"])
    assert mc.exit_code == 0, mc.output
    m = json.loads(mc.output[mc.output.index("{"):])
    assert m["count"] > 0 and 0.0 <= m["accuracy"] <= 100.0 and m["chance"] == pytest.approx(20.0)
