"""Shared fixtures: tiny random-init model configs (no MiniLM load) and a tiny SynthVL data set."""

from __future__ import annotations

import copy

import pytest


def tiny_model_dict(kind: str = "encoder", vocab_size: int = 100, num_frames: int = 4) -> dict:
    """Plain-dict model config (what a YAML `model:` section holds): a few-thousand-parameter model.

    Text dropout is 0 so that forward passes are deterministic in train mode too.
    """
    return {
        "video": {"image_size": 32, "patch_size": 16, "tubelet_size": 2, "num_frames": num_frames,
                  "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "text": {"pretrained": None, "vocab_size": vocab_size, "hidden_size": 32, "num_layers": 2,
                 "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
                 "dropout": 0.0, "attention_dropout": 0.0},
        "fusion": {"kind": kind, "num_layers": 1, "num_heads": 2},
        "embed_dim": 16,
    }


@pytest.fixture
def tiny_model_config():
    """Factory: `tiny_model_config(kind="encoder"|"backbone"|"none", vocab_size=100, num_frames=4)` → ModelConfig."""
    from evl.config import from_dict
    from evl.models.model import ModelConfig

    def make(kind: str = "encoder", vocab_size: int = 100, num_frames: int = 4) -> ModelConfig:
        return from_dict(ModelConfig, tiny_model_dict(kind, vocab_size, num_frames), where="model")

    return make


@pytest.fixture(scope="session")
def tiny_model_dict_factory():
    """Factory returning a fresh (deep-copied) plain-dict tiny model config."""
    return lambda *a, **k: copy.deepcopy(tiny_model_dict(*a, **k))


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory, tiny_model_dict_factory):
    """An untrained tiny video-language model saved as a checkpoint (what `evl pretrain` writes), seed 0."""
    import torch

    from evl.models.model import build_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "final"
    build_model(tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread, then restore the previous setting.

    Tiny models gain nothing from more threads, and on a shared, busy CPU extra OpenMP threads only
    spin against other processes (measured here: 61 s → 9 s for the model/recipe/CLI tests).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthvl(tmp_path_factory):
    """A 12-clip SynthVL set (8 frames of 32x32) written once per session; returns its folder."""
    from evl.data.synthetic import write_synthvl

    out = tmp_path_factory.mktemp("synthvl")
    write_synthvl(out, clips=12, seed=0, frames=8, size=32)
    return out


HELD_OUT = 0   # the caption of each clip that `trained` leaves out of training


def _captions(synthvl) -> dict[str, list[str]]:
    from pathlib import Path

    from evl.data.annotations import read_annotations

    out: dict[str, list[str]] = {}
    for name in ("pretrain.json", "retrieval_val.json", "retrieval_test.json"):
        for r in read_annotations(synthvl / "annotations" / name):
            out.setdefault(Path(r.video).name, []).extend(c for c in r.captions if c not in out.get(Path(r.video).name, []))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthvl, tiny_model_dict_factory):
    """A tiny model trained (VTC + VTM) on 4 of the 5 captions of each of the 12 clips, so that text finds
    video. Returns (final/, captions): `captions[name][0]` (HELD_OUT) was never trained on — queries use it."""
    import json

    import yaml
    from typer.testing import CliRunner

    from evl.cli import app

    tmp = tmp_path_factory.mktemp("search_model")
    caps = _captions(synthvl)
    trained_on = [{"video": v, "caption": c} for v, cs in caps.items() for i, c in enumerate(cs) if i != HELD_OUT]
    (tmp / "all.json").write_text(json.dumps(trained_on))
    recipe = {"task": "pretrain", "model": tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4),
              "objectives": {"vtc": 1.0, "vtm": 1.0},
              "data": {"train": str(tmp / "all.json"), "videos": str(synthvl / "videos")},
              "train": {"max_steps": 200, "batch_size": 12, "lr": 2e-3, "warmup_steps": 5, "ckpt_every": 0,
                        "log_every": 40, "out_dir": str(tmp / "run"), "precision": "fp32"}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)   # the same numerics whichever test module asks first
    try:
        result = CliRunner().invoke(app, ["pretrain", str(tmp / "r.yaml"), "--no-eval"])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    return tmp / "run" / "final", caps


# ------------------------------------------------------------------------------------- the fast tier
# `make test-fast` (pytest -m "not slow") leaves these out: end-to-end runs (training, torchrun, kills and
# resumes, a browser, ONNX export, the trained folders of test_api.py) and the tests that took 0.7 s or more
# in `pytest --durations=0` here.
# `make test` — what CI runs — still runs every test.
SLOW_MODULES = {"test_api.py", "test_quickstart.py", "test_resume_cli.py", "test_search_reliability.py", "test_torchrun.py", "test_torchrun_model.py"}
SLOW_TESTS = {
    "test_a_resume_with_another_worker_count_goes_on_at_the_same_point_of_the_epoch",
    "test_two_ranks_killed_mid_epoch_and_resumed_train_exactly_as_uninterrupted",
    "test_a_query_naming_what_a_video_shows_ranks_it_first",
    "test_a_re_export_leaves_nothing_stale_and_indexes_do_not_mix_frame_counts",
    "test_a_step_checkpoint_has_its_tokenizer_before_latest_points_at_it",
    "test_bad_recipe_values_are_refused_while_loading",
    "test_cli_index_segments_search_and_rerank",
    "test_cli_pretrain_and_finetune",
    "test_csv_readers_return_records_or_their_own_error",
    "test_dual_embeddings_are_the_evaluation_paths",
    "test_final_is_written_whole_or_not_at_all",
    "test_finetune_from_checkpoint_uses_its_architecture",
    "test_fresh_run_into_a_used_out_dir_refuses_and_keeps_the_old_run",
    "test_hard_negatives_exclude_positives_and_follow_softmax",
    "test_ids_equal_hf_tokenizer",
    "test_index_and_search_run_on_the_exported_encoders",
    "test_json_readers_return_records_or_their_own_error",
    "test_killed_and_resumed_run_logs_exactly_the_same_losses",
    "test_lit_recipe_trains_only_above_the_lock",
    "test_minilm_matches_sentence_transformers",
    "test_missing_dependency_fails_in_ci_naming_it",
    "test_missing_dependency_skips_outside_ci_saying_how_to_get_it",
    "test_odd_recipe_files_are_one_line_errors",
    "test_onnx_export_matches_pytorch_and_int8_stays_close",
    "test_page_in_a_real_browser_search_open_ask",
    "test_pretrain_refuses_to_replace_a_final_whose_checkpoints_were_deleted",
    "test_pretrain_with_the_egovlpv2_recipe_then_eval_rerank_and_mc",
    "test_rank_helpers",
    "test_reindex_after_add_change_delete_updates_index_and_metadata_exactly",
    "test_resume_past_max_steps_refuses_and_keeps_final",
    "test_run_recipe_pretrain_end_to_end",
    "test_run_recipe_qa_end_to_end",
    "test_search_scores_equal_the_core_retrieval_scores",
    "test_search_thumbnails_and_videos",
    "test_teacher_then_prompter_student_with_distillation_then_eval_and_ask",
    "test_user_errors_are_clear",
    "test_vq_train_then_pretrain_with_mvm_then_eval_without_the_tokenizer",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
