"""A sweep of odd inputs over every command: each is refused with exit status 2 and one `error:` line that
names the key or option (and no traceback, no out-of-memory kill, nothing written).

Every case here failed before this sweep (a traceback, an allocation of many GB, a multi-line or GB-long
message, a silent exit 0 on invalid input, an error that did not name the key or option, or - the quickstart's
step counts - an error only after minutes of synthesis and training), except the ones listed in GUARDS, which
were already right and are kept so that they stay right. `--batch-size`/`--rerank-k` of `evl eval` had no upper
bound before (harmless: a batch is at most the data set); their cases check the bound stated in --help now.
Nothing here trains: every input is refused while the recipe or the options are read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli_checks import error_line, invoke
from evl.cli import app
from evl.data import MAX_FRAMES, MAX_SYNTH_CLIPS, MAX_SYNTH_SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()

# already refused with a one-line error before the sweep; guards, not fixes
GUARDS = {"yaml-list", "override-empty-key", "override-lr-abc", "test_guard_ask_top", "test_packaged_configs_still_load"}


def _error(args: list) -> str:
    """The one `error:` line of a command that must exit with status 2 and no traceback."""
    return error_line(invoke(args))


# ------------------------------------------------------------------ recipe files: odd YAML

YAML_FILES = {
    # name: (file bytes, what the error line must contain)
    "yaml-not-utf8": (b"\xff\xfe\x00task: pretrain\n", "not a UTF-8 text file (byte 0xff at offset 0)"),
    "yaml-latin1": ("task: pr\xe9train\n".encode("latin-1"), "not a UTF-8 text file (byte 0xe9 at offset 8)"),
    "yaml-int-key": (b"1: 2\n", "key 1 (int) is not a name"),
    "yaml-null-key": (b"null: x\n", "key None (NoneType) is not a name"),
    "yaml-nested-int-key": (b"train:\n  1: 2\n", ".train: key 1 (int) is not a name"),
    "yaml-duplicate-key": (b"task: pretrain\ntask: qa\n", "key 'task' is given twice (lines 1 and 2)"),
    "yaml-duplicate-nested-key": (b"train:\n  lr: 1\n  lr: 2\n", "key 'lr' is given twice (lines 2 and 3)"),
    "yaml-unhashable-key": (b"? [a, b]\n: c\n", "not valid YAML: line 1, column 3: found unhashable key"),
    "yaml-base-list": (b"base: [1, 2]\n", "base: must name one config"),
    "yaml-base-int": (b"base: 5\n", "base: must name one config"),
    "yaml-nested-too-deep": (b"task: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    # an alias bomb: 9^9 strings behind a few lines; the message shows a short repr, not gigabytes
    "yaml-alias-bomb": (("data: {train: [&a [x,x,x,x,x,x,x,x,x], " + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "]}\n").encode(),
        ".data.train: expected a string, got [["),
    "yaml-list": (b"- a\n- b\n", "expected a mapping at the top level, got list"),
    "yaml-tabs-names-line": (b"train:\n\tmax_steps: 1\n", "not valid YAML: line 2, column 1: found character '\\t'"),
}


@pytest.mark.parametrize("command", [["pretrain"], ["vq", "train"], ["vlap", "train"]])
@pytest.mark.parametrize("name", sorted(YAML_FILES))
def test_odd_recipe_files_are_one_line_errors(tmp_path, command, name):
    content, expected = YAML_FILES[name]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    message = _error([*command, path])
    assert str(path) in message and expected in message


def test_a_recipe_base_that_is_not_utf8_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_bytes(b"train: {lr: 1}\n# caf\xe9\n")
    (tmp_path / "recipe.yaml").write_text("base: base.yaml\n")
    message = _error(["pretrain", tmp_path / "recipe.yaml"])
    assert f"{tmp_path / 'base.yaml'}: not a UTF-8 text file" in message


# ------------------------------------------------------------------ recipe values: refused while loading

RECIPE_VALUES = [
    # (case, override, what the error line must contain)
    ("model-embed-dim-0", "model.embed_dim=0", "model.embed_dim=0: must be between 1 and 16384"),
    ("model-embed-dim-negative", "model.embed_dim=-1", "model.embed_dim=-1: must be between 1"),
    ("model-num-answers-negative", "model.num_answers=-1", "model.num_answers=-1: must be between 0 and 1000000"),
    ("model-num-answers-huge", "model.num_answers=1000000000000", "model.num_answers=1000000000000: must be"),
    ("fusion-heads-0", "model.fusion.num_heads=0", "fusion.num_heads=0: must be between 1"),
    ("fusion-heads-not-divisor", "model.fusion.num_heads=5", "fusion.num_heads=5 does not divide"),
    ("fusion-mlp-ratio-negative", "model.fusion.mlp_ratio=-1", "fusion.mlp_ratio=-1.0: must be between 0.25 and 64"),
    ("video-mlp-ratio-0", "model.video.mlp_ratio=0", "video.mlp_ratio=0.0: must be between 0.25 and 64"),
    ("video-dropout-2", "model.video.dropout=2", "video.dropout=2.0: must be between 0 and 0.999"),
    ("text-dropout-negative", "model.text.dropout=-1", "text.dropout=-1.0: must be between 0 and 0.999"),
    ("video-eps-negative", "model.video.layer_norm_eps=-1", "video.layer_norm_eps=-1.0: must be between"),
    ("video-hidden-huge", "model.video.hidden_size=100000000", "video.hidden_size=100000000: must be between 1 and 16384"),
    ("video-frames-huge", "model.video.num_frames=100000", f"video.num_frames=100000: must be between 1 and {MAX_FRAMES}"),
    ("video-image-huge", "model.video.image_size=1048576", "makes 8589934592 tokens per clip; at most 65536"),
    ("video-channels-huge", "model.video.in_channels=100000", "video.in_channels=100000: must be between 1 and 16"),
    ("text-vocab-huge", "model.text.vocab_size=10000000000", "text.vocab_size=10000000000: must be between 1 and 1000000"),
    ("text-cache-huge", "model.text.locked_cache=1000000000000", "text.locked_cache=1000000000000: must be between 0"),
    ("train-workers-huge", "train.num_workers=100000", "train.num_workers=100000: must be between 0 and 64"),
    ("train-seed-huge", "train.seed=1e30", "train.seed=1000000000000000019884624838656: must be between"),
    ("train-betas", "train.betas=[1,2]", "train.betas[0]=1.0: must be between 0 and 0.999999"),
    ("train-eps-0", "train.eps=0", "train.eps=0.0: must be between"),
    ("train-lr-mult-negative", "train.lr_mults={text: -1}", "train.lr_mults.text=-1.0: an lr multiplier must be"),
    ("train-out-dir-empty", "train.out_dir=", "train.out_dir is empty"),
    ("eval-batch-size-0", "eval.batch_size=0", "eval.batch_size=0: must be between 1 and 100000"),
    ("eval-rerank-negative", "eval.rerank_k=-1", "eval.rerank_k=-1: must be between 0 and 100000"),
    ("override-deep-value", "task=" + "[" * 20000 + "]" * 20000, "override task=...: the value is nested too deeply"),
    ("override-empty-key", "=1", "override '=1' has an empty key"),
    ("override-lr-abc", "train.lr=abc", "train.lr: expected a number, got 'abc'"),
]


@pytest.mark.parametrize("override, expected", [c[1:] for c in RECIPE_VALUES], ids=[c[0] for c in RECIPE_VALUES])
def test_bad_recipe_values_are_refused_while_loading(tmp_path, tiny_model_dict_factory, override, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "pretrain", "model": tiny_model_dict_factory("encoder", vocab_size=30522), "objectives": {"vtc": 1.0},
        "data": {"train": str(tmp_path / "none.json")},
        "train": {"max_steps": 1, "batch_size": 4, "out_dir": str(tmp_path / "run")}}))
    assert expected in _error(["pretrain", recipe, "--no-eval", override])
    assert not (tmp_path / "run").exists()


def test_a_duplicate_key_in_an_override_value_is_refused():
    from evl.config import parse_overrides
    from evl.errors import ConfigError

    # the override's YAML is read with the same loader as a recipe: a repeated key is not silently dropped
    with pytest.raises(ConfigError, match=r"override 'objectives=.*key 'vtc' is given twice"):
        from evl.recipes import load_recipe
        load_recipe("pretrain-tiny", ["objectives={vtc: 1, vtc: 2}"])
    assert parse_overrides(["a={b: 1}"]) == {"a": {"b": 1}}


VQ_VALUES = [
    ("tokenizer.num_codes=1000000000000", "tokenizer.num_codes=1000000000000: must be between 2 and 1000000"),
    ("tokenizer.code_dim=1000000000000", "tokenizer.code_dim=1000000000000: must be between 1 and 16384"),
    ("tokenizer.decoder_layers=1000000000", "tokenizer.decoder_layers=1000000000: must be between 1 and 256"),
    ("tokenizer.kmeans_iters=1000000000000", "tokenizer.kmeans_iters=1000000000000: must be between 1 and 10000"),
]


@pytest.mark.parametrize("override, expected", VQ_VALUES)
def test_vq_sizes_have_upper_bounds(override, expected):
    assert expected in _error(["vq", "train", "vq-tiny", override])


VLAP_VALUES = [
    ("model.prompter_width=0", "model.prompter_width=0: must be between 1 and 16384"),
    ("model.answerer_layers=0", "model.answerer_layers=0: must be between 1 and 256"),
    ("model.answerer_heads=0", "model.answerer_heads=0: must be between 1"),
    ("model.answerer_heads=7", "model.answerer_heads=7 does not divide the answerer's width"),
    ("model.num_answers=-1", "model.num_answers=-1: must be between 0 and 1000000"),
    ("model.max_text_len=0", "model.max_text_len=0: must be between 1 and 512 question tokens"),
    ("model.max_text_len=1000000000", "model.max_text_len=1000000000: must be between 1 and 512"),
    ("model.qformer.num_queries=1000000000", "qformer.num_queries=1000000000: must be between 1 and 1024"),
    ("model.qformer.mlp_ratio=0", "qformer.mlp_ratio=0.0: must be between 0.25 and 64"),
]


@pytest.mark.parametrize("override, expected", VLAP_VALUES)
def test_vlap_model_values_are_refused_while_loading(override, expected):
    assert expected in _error(["vlap", "train", "vlap-tiny", override])


def test_vlap_feature_cache_that_is_a_file_is_refused_before_extracting(tmp_path, synthvl, tiny_model_dict_factory):
    import torch

    from evl.models.model import build_model

    torch.manual_seed(0)
    base = tmp_path / "base"
    build_model(tiny_model_dict_factory("encoder", vocab_size=30522)).save_pretrained(base)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ann = synthvl / "annotations"
    message = _error(["vlap", "train", "vlap-teacher-tiny", f"backbone={base}", "init=null", "data.test=null",
                      f"data.train={ann / 'qa_train.json'}", f"data.videos={synthvl / 'videos'}",
                      "model.num_candidates=4", "train.max_steps=1", "train.batch_size=4",
                      f"train.out_dir={tmp_path / 'run'}", f"feature_cache={blocker}"])
    assert f"feature_cache={blocker} cannot be made a folder" in message
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------ command options


@pytest.mark.parametrize("extra, expected", [
    (["--size", 100000], f"size must be even and between 16 and {MAX_SYNTH_SIZE} pixels"),
    (["--frames", 1000000], f"frames must be between 4 (events need at least 2 frames) and {MAX_FRAMES}"),
    (["--clips", 10**9], f"clips must be an integer between 1 and {MAX_SYNTH_CLIPS}, got 1000000000"),
])
def test_synth_sizes_have_upper_bounds_stated_in_help(tmp_path, extra, expected):
    assert expected in _error(["synth", tmp_path / "s", "--clips", 2, "--frames", 4, "--size", 16, *extra])
    assert not (tmp_path / "s").exists()
    help_text = " ".join(runner.invoke(app, ["synth", "--help"]).output.split())
    assert f"1 to {MAX_SYNTH_CLIPS}" in help_text and f"4 to {MAX_FRAMES}" in help_text
    assert f"16 to {MAX_SYNTH_SIZE}" in help_text


@pytest.mark.parametrize("below", [False, True])
def test_synth_into_a_file_names_out_dir(tmp_path, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "x" if below else blocker
    message = _error(["synth", out, "--clips", 2, "--frames", 4, "--size", 16])
    assert f"OUT_DIR {out}: cannot write there" in message


@pytest.mark.parametrize("extra, expected", [
    (["--frames", 0], f"--frames 0: must be between 1 and {MAX_FRAMES}"),
    (["--frames", -1], f"--frames -1: must be between 1 and {MAX_FRAMES}"),
    (["--frames", 1000000], f"--frames 1000000: must be between 1 and {MAX_FRAMES}"),
    (["--repeats", 0], "--repeats 0: must be between 1 and 1000"),
    (["--batch-sizes", "a"], "--batch-sizes must list integers from 1 to 256"),
    (["--batch-sizes", "1000000000"], "--batch-sizes must list integers from 1 to 256"),
    (["--device", "banana"], "--device='banana' is not a device"),
])
def test_bench_model_options_are_bounded(extra, expected):
    assert expected in _error(["bench", "model", "tiny", "--repeats", 1, "--batch-sizes", 1, *extra])


@pytest.mark.parametrize("extra, expected", [
    (["--pretrain-steps", 0], "--pretrain-steps 0: must be >= 1"),
    (["--retrieval-steps", -1], "--retrieval-steps -1: must be >= 1"),
    (["--qa-steps", 0], "--qa-steps 0: must be >= 1"),
    (["--seed", -1], "--seed -1: must be a non-negative integer"),
    (["--clips", 10**9], f"--clips 1000000000: at most {MAX_SYNTH_CLIPS}"),
])
def test_quickstart_options_are_refused_before_any_work(tmp_path, extra, expected):
    assert expected in _error(["quickstart", "--out", tmp_path / "qs", *extra])
    assert not (tmp_path / "qs").exists()


def test_quickstart_out_that_is_a_file_names_the_option(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert f"--out {blocker}: cannot write there" in _error(["quickstart", "--out", blocker])


# ------------------------------------------------------------------ guards (already right)


@pytest.mark.parametrize("extra, expected", [(["--batch-size", 10**9], "--batch-size 1000000000: must be between 1"),
                                             (["--rerank-k", 10**9], "--rerank-k 1000000000: must be between 0")])
def test_eval_batch_options_are_bounded(tmp_path, extra, expected):
    assert expected in _error(["eval", tmp_path, "--task", "retrieval", "--data", tmp_path / "x.json", *extra])


def test_guard_ask_top(tmp_path):
    assert "--top 0: must be >= 1" in _error(["ask", tmp_path / "v.mp4", "what?", "--model", tmp_path, "--top", 0])


def test_check_range_messages():
    from evl.config import check_range
    from evl.errors import ConfigError

    check_range("k", 3, 1, 3)
    for value in (0, 4, float("nan")):
        with pytest.raises(ConfigError, match=r"^k=.*: must be between 1 and 3 things$"):
            check_range("k", value, 1, 3, " things")
    with pytest.raises(ConfigError, match=r"^k=-1: must be >= 0$"):
        check_range("k", -1, 0)


def test_packaged_configs_still_load():
    from evl.config import CONFIG_DIR, load_yaml, packaged_configs
    from evl.recipes import load_recipe
    from evl.techniques.evilm.vq_train import load_vq_recipe
    from evl.techniques.vlap.train import load_vlap_recipe

    assert {"pretrain-tiny", "smaug-tiny", "evilm-tiny", "egovlpv2-tiny"} <= set(packaged_configs("recipes"))
    for name in packaged_configs("recipes"):
        load_recipe(name)
    for name in packaged_configs("models"):
        load_yaml(name, "models")
    for name in packaged_configs("tokenizers"):
        load_vq_recipe(name, [])
    assert {"vlap-tiny", "vlap-teacher-tiny"} <= set(packaged_configs("vlap"))
    for name in packaged_configs("vlap"):
        load_vlap_recipe(name, [])
    assert Path(CONFIG_DIR).is_dir()
