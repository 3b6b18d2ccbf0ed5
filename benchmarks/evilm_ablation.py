"""E-ViLM's MVM target ablation, side by side in one run: none / pixel / VQ-VAE codes / semantic VQ codes.

The same tiny model, SynthVL data and number of steps for every row. First a teacher (the tiny model
pre-trained with VTC + VTM + MLM, `pretrain-tiny`) and three tokenizers (`vq-tiny`): semantic (the
teacher's video features) and pixel (VQ-VAE), both with dead-code restart, and semantic without it
(BEiT-v2's setting); their codebook usage is reported. Then, per seed and target, pre-training with VTC + VTM + MLM (+ MVM with that target),
retrieval fine-tuning (`--retrieval-steps`; 0 = zero-shot) and QA fine-tuning from the checkpoint, and
text→video R@1 and QA accuracy on the held-out test split — all of it, the clips with colour×shape×verb
combinations never seen in training ("held_out"), and the rest ("seen"). Mean ± half-range over seeds.

Usage: python benchmarks/evilm_ablation.py [--seeds 0 1] [--pretrain-steps 100] [--vq-steps 150]
       [--retrieval-steps 70] [--qa-steps 150] [--clips 500] [--work DIR]
Prints a table and writes benchmarks/results/evilm_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "evilm_ablation.json"
TARGETS = ("none", "pixel", "vqvae", "semantic")
TOKENIZERS = {"semantic": ["tokenizer.restart_dead=1.0"],
              "vqvae": ["tokenizer.target=pixel", "teacher=null", "tokenizer.restart_dead=1.0"],
              "semantic, no restart": ["tokenizer.restart_dead=0"]}


def _overrides(data: Path, out: Path, files: tuple[str, str], steps: int, seed: int) -> list[str]:
    ann = data / "annotations"
    return [f"data.train={ann / files[0]}", f"data.test={ann / files[1]}", f"data.videos={data / 'videos'}",
            f"train.out_dir={out}", f"train.max_steps={steps}", f"train.seed={seed}", "train.ckpt_every=0",
            "train.overwrite=true"]


def train_tokenizers(data: Path, teacher: str, steps: int, work: Path) -> dict[str, dict]:
    from evl.techniques.evilm.vq_train import load_vq_recipe, train_tokenizer

    out = {}
    for name, extra in TOKENIZERS.items():
        over = [f"data.train={data / 'annotations' / 'pretrain.json'}", f"data.videos={data / 'videos'}",
                f"train.out_dir={work / ('vq-' + name.replace(', ', '-').replace(' ', '-'))}", f"train.max_steps={steps}", "train.overwrite=true",
                f"teacher={teacher}", *extra]
        summary = train_tokenizer(load_vq_recipe("vq-tiny", over))
        out[name] = {"checkpoint": summary["checkpoint"], "usage": summary["usage"],
                     "final_losses": summary["final_losses"], "train_time_s": round(summary["train_time_s"], 1)}
        print(json.dumps({"tokenizer": name, **out[name]}), flush=True)
    return out


def objectives(target: str, tokenizers: dict[str, dict]) -> dict:
    spec: dict = {"vtc": 1.0, "vtm": 1.0, "mlm": {"weight": 1.0, "mask_prob": 0.15}}
    if target == "pixel":
        spec["mvm"] = {"weight": 1.0, "target": "pixel", "mask": "blockwise", "mask_ratio": 0.4}
    elif target in ("vqvae", "semantic"):
        spec["mvm"] = {"weight": 1.0, "target": "codes", "tokenizer": tokenizers[target]["checkpoint"],
                       "mask": "blockwise", "mask_ratio": 0.4}
    return spec


def run_row(target: str, seed: int, args, data: Path, tokenizers: dict[str, dict]) -> dict:
    from evl.data.answers import AnswerVocab
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.quickstart import compositional_breakdown
    from evl.recipes import load_recipe, run_recipe

    work = args.work / f"s{seed}-{target}"
    spec = json.dumps(objectives(target, tokenizers))
    t0 = time.perf_counter()
    pre = run_recipe(load_recipe("pretrain-tiny", [f"objectives={spec}", *_overrides(
        data, work / "pre", ("pretrain.json", "retrieval_val.json"), args.pretrain_steps, seed)]), evaluate=False)
    if args.retrieval_steps > 0:
        ret = run_recipe(load_recipe("retrieval-tiny", _overrides(
            data, work / "ret", ("retrieval_train.json", "retrieval_test.json"), args.retrieval_steps, seed)),
            init=pre["checkpoint"], evaluate=False)["checkpoint"]
    else:
        ret = pre["checkpoint"]
    qa = run_recipe(load_recipe("qa-tiny", _overrides(data, work / "qa", ("qa_train.json", "qa_test.json"),
                                                      args.qa_steps, seed)), init=pre["checkpoint"], evaluate=False)
    ret_model, qa_model = VideoLanguageModel.from_pretrained(ret), VideoLanguageModel.from_pretrained(qa["checkpoint"])
    vocab = AnswerVocab.from_json((Path(qa["checkpoint"]) / "answers.json").read_text())
    tok = tokenizer_for(ret_model.cfg, ret)
    parts = compositional_breakdown(ret_model, qa_model, vocab, data / "annotations", data / "videos", tok, all_too=True)
    return {"target": target, "seed": seed, "pretrain_losses": pre["final_losses"],
            "pretrain_s": round(pre["train_time_s"], 1), "total_s": round(time.perf_counter() - t0, 1), **parts}


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def print_table(rows: list[dict], tokenizers: dict[str, dict]) -> None:
    print("\ntokenizers (codebook usage over the training clips):")
    for name, t in tokenizers.items():
        u = t["usage"]
        print(f"  {name:17s} codes used {u['codes_used']}/{u['num_codes']} ({100 * u['fraction_used']:.0f}%), "
              f"perplexity {u['perplexity']}, reconstruction loss {t['final_losses'].get('rec', float('nan')):.3f}")
    head = f"\n{'MVM target':10s} " + " ".join(f"{h:>13s}" for h in (
        "T2V R@1 all", "R@1 held-out", "R@1 seen", "QA all", "QA held-out", "QA seen"))
    print(head)
    print("-" * len(head))
    for target in TARGETS:
        rs = [r for r in rows if r["target"] == target]
        if not rs:
            continue
        cells = [_mean_spread([r[part]["t2v_r1"] for r in rs]) for part in ("all", "held_out", "seen")]
        cells += [_mean_spread([r[part]["qa_accuracy"] for r in rs]) for part in ("all", "held_out", "seen")]
        print(f"{target:10s} " + " ".join(f"{c:>13s}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--vq-steps", type=int, default=150)
    ap.add_argument("--retrieval-steps", type=int, default=70)
    ap.add_argument("--qa-steps", type=int, default=150)
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    from evl.data.synthetic import write_synthvl
    from evl.precision import cpu_info
    from evl.recipes import load_recipe, run_recipe

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or Path(tmp)
        data = args.work / "synthvl"
        if not (data / "annotations" / "pretrain.json").is_file():
            write_synthvl(data, clips=args.clips, seed=0, frames=16, size=64)
        teacher = run_recipe(load_recipe("pretrain-tiny", _overrides(
            data, args.work / "teacher", ("pretrain.json", "retrieval_val.json"), args.pretrain_steps, 0)),
            evaluate=False)["checkpoint"]
        tokenizers = train_tokenizers(data, teacher, args.vq_steps, args.work)
        info = cpu_info()
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "work")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        for seed in args.seeds:
            for target in TARGETS:
                rows.append(run_row(target, seed, args, data, tokenizers))
                print(json.dumps(rows[-1]), flush=True)
                # after every row, so an interrupted run keeps what it measured
                args.json.write_text(json.dumps({"cpu": info, "settings": settings, "tokenizers": tokenizers,
                                                 "rows": rows, "complete": False,
                                                 "wall_s": round(time.perf_counter() - t0, 1)}, indent=2, default=str))
    print(f"\nCPU: {info['model']} ({info['capability']}, {info['cores']} cores), torch {info['torch']}")
    print_table(rows, tokenizers)
    args.json.write_text(json.dumps({"cpu": info, "settings": settings, "tokenizers": tokenizers, "rows": rows,
                                     "complete": True, "wall_s": round(time.perf_counter() - t0, 1)},
                                    indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
