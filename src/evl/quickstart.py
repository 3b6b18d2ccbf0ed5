"""`evl quickstart`: the main job, end to end on one CPU in ≤ 15 minutes.

SynthVL → check → pre-train tiny with the most accurate recipe per CPU-minute measured by
`benchmarks/efficiency_sweep.py` (`PRETRAIN_RECIPE`; `--pretrain-recipe pretrain-tiny` runs the dense
VTC+VTM+MLM baseline) → fine-tune retrieval (VTC+VTM) and QA from the pre-trained checkpoint → evaluate
retrieval, QA and multiple choice on the held-out test split → one table (with chance / majority
baselines, params, GFLOPs, training time), `report.json` and a plot of the training curves in `--out`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from evl.config import to_dict
from evl.errors import ConfigError, EvlError

DEFAULT_CLIPS = 1550   # 1,400 train / 50 val / 100 test (quickstart_splits)
PRETRAIN_RECIPE = "pretrain-tiny-lit"   # benchmarks/efficiency_sweep.py: most accurate at the quickstart budget


def _stage(name: str) -> None:
    print(f"\n== {name} ==", flush=True)


def _recipe(name: str, data_dir: Path, out_dir: Path, split_files: tuple[str, str], steps: int | None,
            extra: list[str] | None = None):
    from evl.recipes import load_recipe

    ann = data_dir / "annotations"
    overrides = [f"data.train={ann / split_files[0]}", f"data.test={ann / split_files[1]}",
                 f"data.videos={data_dir / 'videos'}", f"train.out_dir={out_dir}",
                 "train.overwrite=true"]   # a quickstart re-run into the same --out starts over
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    return load_recipe(name, overrides + (extra or []))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(stages: dict[str, Path], out_png: Path) -> None:
    """One panel per stage: every logged loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evl.losses.registry import term_names

    plotted = {"loss", *term_names()}
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, (name, run_dir) in zip(axes[0], stages.items(), strict=True):
        rows = [r for r in _read_metrics(run_dir / "metrics.jsonl") if "step" in r]
        keys = sorted({k for r in rows for k in r if k in plotted})
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def format_table(report: dict) -> str:
    r, q, mc, eff = report["retrieval"], report["qa"], report["mc"], report["efficiency"]
    lines = ["", "evl quickstart — SynthVL held-out test split (tiny model, CPU)", "-" * 66]
    if "pretrain_recipe" in report:
        lines.append(f"{'pre-training recipe':24s} {report['pretrain_recipe']} "
                     f"({' + '.join(report['train']['objectives']['pretrain'])}, {report['train']['steps']['pretrain']} steps)")
    lines.append(f"{'text→video':24s} R@1 {r['t2v_r1']:5.1f}   R@5 {r['t2v_r5']:5.1f}   R@10 {r['t2v_r10']:5.1f}   "
                 f"MdR {r['t2v_medr']:.0f}")
    lines.append(f"{'  chance':24s} R@1 {r['chance_r1']:5.1f}   R@5 {r['chance_r5']:5.1f}   R@10 {r['chance_r10']:5.1f}")
    if "rerank_t2v_r1" in r:
        lines.append(f"{'  re-rank: fusion score':24s} R@1 {r['rerank_t2v_r1']:5.1f}   R@5 {r['rerank_t2v_r5']:5.1f}   "
                     f"R@10 {r['rerank_t2v_r10']:5.1f}   (top-{r['rerank_rerank_k']:.0f})")
        lines.append(f"{'  re-rank: dual + fusion':24s} R@1 {r['ensemble_t2v_r1']:5.1f}   R@5 {r['ensemble_t2v_r5']:5.1f}   "
                     f"R@10 {r['ensemble_t2v_r10']:5.1f}")
    lines.append(f"{'video→text':24s} R@1 {r['v2t_r1']:5.1f}   R@5 {r['v2t_r5']:5.1f}   R@10 {r['v2t_r10']:5.1f}")
    base = q.get("baseline", {})
    lines.append(f"{'QA accuracy (all)':24s} {q['accuracy']:5.1f}   majority answer {base.get('accuracy', float('nan')):5.1f}"
                 f"   per-type majority {base.get('per_type_majority', {}).get('accuracy', float('nan')):5.1f}")
    per_type_majority = base.get("per_type_majority", {}).get("per_type", {})
    for t, acc in sorted(q["per_type"].items()):
        maj = per_type_majority.get(t, float("nan"))
        lines.append(f"{'  ' + t:24s} {acc:5.1f}   type's majority answer {maj:5.1f}   (n={q['count_per_type'][t]})")
    for name, c in report.get("compositional", {}).items():
        label = "held-out combinations" if name == "held_out" else "seen combinations"
        lines.append(f"{'  ' + label:24s} t2v R@1 {c['t2v_r1']:5.1f} (chance {c['chance_r1']:.1f}, "
                     f"{c['videos']} videos)   QA {c['qa_accuracy']:5.1f}")
    lines.append(f"{'multiple choice (5-way)':24s} {mc['accuracy']:5.1f}   chance {mc['chance']:.1f}")
    lines.append(f"{'params':24s} {eff['params']['total'] / 1e6:.1f} M (video {eff['params']['video'] / 1e6:.1f}, "
                 f"text {eff['params']['text'] / 1e6:.1f}, fusion {eff['params']['fusion'] / 1e6:.1f})")
    lines.append(f"{'GFLOPs / clip':24s} dual {eff['gflops_dual']:.2f}   fusion path {eff['gflops_fusion']:.2f}")
    m = report.get("machine", {})
    if m:
        lines.append(f"{'machine':24s} {m.get('model', '?')}, {m.get('cores', '?')} cores, {m.get('capability', '?')}; "
                     f"training precision {m.get('precision', '?')}")
    t = report["time_s"]
    lines.append(f"{'time (s)':24s} synth {t['synth']:.0f}   pretrain {t['pretrain']:.0f}   retrieval ft "
                 f"{t['retrieval']:.0f}   QA ft {t['qa']:.0f}   eval {t['eval']:.0f}   total {t['total']:.0f}")
    lines.append("-" * 66)
    return "\n".join(lines)


def compositional_breakdown(ret_model, qa_model, vocab, ann: Path, videos: Path, tok, all_too: bool = False) -> dict:
    """Retrieval and QA on test clips with colour×shape×verb combinations never seen in training
    ("held_out") vs the other test clips ("seen"), each subset ranked against its own gallery; with
    `all_too`, the whole test split as well ("all")."""
    from evl.data.annotations import read_annotations
    from evl.tasks.evaluate import EvalSettings, evaluate_qa, evaluate_retrieval

    settings = EvalSettings(batch_size=32, rerank_k=0)
    out: dict[str, dict] = {}
    ret = read_annotations(ann / "retrieval_test.json")
    qa = read_annotations(ann / "qa_test.json")
    parts = (("all", None),) * all_too + (("held_out", True), ("seen", False))
    for name, flag in parts:
        r_sub = [r for r in ret if flag is None or bool(r.meta.get("compositional")) == flag]
        q_sub = [r for r in qa if flag is None or bool(r.meta.get("compositional")) == flag]
        if not r_sub or not q_sub:
            continue
        m = evaluate_retrieval(ret_model, r_sub, videos, tok, settings)
        q = evaluate_qa(qa_model, q_sub, videos, tok, vocab, settings)
        out[name] = {"videos": m["num_videos"], "t2v_r1": m["t2v_r1"], "chance_r1": m["chance_r1"],
                     "qa_accuracy": q["accuracy"], "qa_count": q["count"]}
    return out


def pretrain_recipe_checked(name: str):
    """The pre-training recipe by packaged name or YAML path; refused unless it is a pre-training one."""
    from evl.recipes import load_recipe

    cfg = load_recipe(name)
    if cfg.task != "pretrain":
        raise ConfigError(f"--pretrain-recipe {name}: its task is {cfg.task!r}; the quickstart pre-trains with a "
                          "'task: pretrain' recipe (e.g. pretrain-tiny, pretrain-tiny-vtc, pretrain-tiny-lit)")
    return cfg


def quickstart_splits(clips: int) -> tuple[int, int, int]:
    """(train, val, test) clips of the quickstart's SynthVL draw: 70/10/20% of the first 500 clips, and every
    clip beyond 500 in the training split — the test split stays at 100 clips, so its figures stay comparable
    while more training clips buy accuracy (`benchmarks/train_data_scale.py`)."""
    base = min(clips, 500)
    val, test = max(1, round(0.1 * base)), max(1, round(0.2 * base))
    return clips - val - test, val, test


def run_quickstart(out: Path, clips: int = DEFAULT_CLIPS, seed: int = 0, pretrain_steps: int | None = None,
                   retrieval_steps: int | None = None, qa_steps: int | None = None,
                   pretrain_recipe: str = PRETRAIN_RECIPE) -> dict:
    from evl.data import MAX_SYNTH_CLIPS
    from evl.data.check import check_annotations
    from evl.data.synthetic import SynthConfig, write_synthvl
    from evl.data.text import tokenizer_for
    from evl.efficiency import count_parameters, gflops_per_clip
    from evl.models.model import VideoLanguageModel
    from evl.precision import cpu_info
    from evl.recipes import evaluate_checkpoint_model, run_recipe

    if clips < 60:
        raise EvlError(f"--clips {clips} is too few: the fine-tuning recipes need at least one batch of 32 "
                       f"training clips (70% of --clips); use --clips 60 or more (default {DEFAULT_CLIPS})")
    if clips > MAX_SYNTH_CLIPS:
        raise EvlError(f"--clips {clips}: at most {MAX_SYNTH_CLIPS} SynthVL clips")
    if seed < 0:
        raise EvlError(f"--seed {seed}: must be a non-negative integer")
    for option, steps in (("--pretrain-steps", pretrain_steps), ("--retrieval-steps", retrieval_steps),
                          ("--qa-steps", qa_steps)):
        if steps is not None and steps < 1:   # refused now, not after minutes of synthesis and training
            raise EvlError(f"{option} {steps}: must be >= 1 training steps (or leave it out for the recipe's)")
    pre_cfg = pretrain_recipe_checked(pretrain_recipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    _stage(f"1/5 synthesise SynthVL ({clips} clips, seed {seed})")
    t0 = time.perf_counter()
    data = out / "synthvl"
    synth = write_synthvl(data, clips=clips, seed=seed, cfg=SynthConfig(frames=16, size=64,
                                                                        split_fractions=quickstart_splits(clips)))
    check = check_annotations(data / "annotations" / "retrieval_test.json", videos_dir=data / "videos")
    print(f"splits {synth['splits']}; test check: {check['records']} records, {check['videos']} videos, "
          f"{check['missing']} missing, {check['undecodable']} undecodable", flush=True)
    times["synth"] = time.perf_counter() - t0

    _stage(f"2/5 pre-train tiny: {pretrain_recipe} ({' + '.join(n.upper() for n in pre_cfg.objectives or {})})")
    pre = run_recipe(_recipe(pretrain_recipe, data, out / "pretrain", ("pretrain.json", "retrieval_val.json"),
                             pretrain_steps), evaluate=False)
    times["pretrain"] = pre["train_time_s"]
    init = pre["checkpoint"]

    _stage("3/5 fine-tune retrieval: VTC + VTM")
    ret = run_recipe(_recipe("retrieval-tiny", data, out / "retrieval", ("retrieval_train.json", "retrieval_test.json"),
                             retrieval_steps), init=init, evaluate=False)
    times["retrieval"] = ret["train_time_s"]

    _stage("4/5 fine-tune open-ended QA")
    qa = run_recipe(_recipe("qa-tiny", data, out / "qa", ("qa_train.json", "qa_test.json"), qa_steps),
                    init=init, evaluate=False)
    times["qa"] = qa["train_time_s"]

    _stage("5/5 evaluate on the held-out test split")
    t0 = time.perf_counter()
    from evl.data.annotations import read_annotations
    from evl.tasks.evaluate import EvalSettings

    settings = EvalSettings(batch_size=32, rerank_k=16)
    ann, videos = data / "annotations", data / "videos"
    ret_model = VideoLanguageModel.from_pretrained(ret["checkpoint"])
    tok = tokenizer_for(ret_model.cfg, ret["checkpoint"])
    retrieval = evaluate_checkpoint_model(ret_model, "retrieval", ann / "retrieval_test.json", videos, tok, settings)
    mc = evaluate_checkpoint_model(ret_model, "mc", ann / "mc_test.json", videos, tok, settings)
    qa_model = VideoLanguageModel.from_pretrained(qa["checkpoint"])
    vocab = VideoLanguageModel.read_vocab(qa["checkpoint"])
    qa_metrics = evaluate_checkpoint_model(qa_model, "qa", ann / "qa_test.json", videos, tok, settings, vocab=vocab,
                                           train_records=read_annotations(ann / "qa_train.json"))
    compositional = compositional_breakdown(ret_model, qa_model, vocab, ann, videos, tok)
    times["eval"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all

    report = {
        "pretrain_recipe": pretrain_recipe,
        "data": {"clips": clips, "seed": seed, "splits": synth["splits"]},
        "retrieval": retrieval, "qa": qa_metrics, "mc": mc,
        "efficiency": {"params": count_parameters(ret_model), **gflops_per_clip(ret_model, ret_model.cfg.video.num_frames)},
        "train": {"pretrain": pre["final_losses"], "retrieval": ret["final_losses"], "qa": qa["final_losses"],
                  "objectives": {"pretrain": pre["objectives"], "retrieval": ret["objectives"], "qa": qa["objectives"]},
                  "steps": {"pretrain": pre["steps"], "retrieval": ret["steps"], "qa": qa["steps"]}},
        "compositional": compositional,
        "model": to_dict(ret_model.cfg),
        "time_s": times,
        "machine": {**cpu_info(), "precision": pre["precision"], "precision_reason": pre["precision_reason"]},
        "checks": {
            "t2v_r1_over_chance": retrieval["t2v_r1"] / retrieval["chance_r1"],
            "qa_over_majority": qa_metrics["accuracy"] / max(qa_metrics["baseline"]["accuracy"], 1e-9),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_curves({"pre-train": out / "pretrain", "retrieval": out / "retrieval", "QA": out / "qa"},
                out / "training_curves.png")
    print(format_table(report))
    print(f"t2v R@1 = {report['checks']['t2v_r1_over_chance']:.1f}x chance; "
          f"QA = {report['checks']['qa_over_majority']:.1f}x the majority answer")
    print(f"wrote {out / 'report.json'} and {out / 'training_curves.png'}")
    return report
