"""Does `fusion.dual_residual` pay? The VTM and QA heads read the fused pair representation; in the
quickstart the cross-modal encoder is trained only by the short fine-tunes (the `pretrain-tiny-lit`
recipe is VTC alone), and existence questions ("is there a red circle?") sit at their yes/no majority.
`dual_residual` adds a learned projection of the dual embeddings' element-wise product to that
representation, so the heads start from the alignment VTC trained.

Protocol: the pre-trained checkpoints of `train_data_scale.py`'s stem condition (1,400 train clips,
755 cached steps of `pretrain-tiny-lit` with `model.video.conv_stem=32`, seeds 0-2; the same 1,000 test
clips for every seed). Per seed, the quickstart's fine-tuning (retrieval 70 steps, QA 150 steps) runs from
that checkpoint twice: as it is (`base`) and with the option added (its projection starts at zero, so
the added checkpoint's outputs equal the original's). Reported per condition: QA accuracy overall, per
type and per subtype, 5-way MC and fine-tuned t→v R@1 (mean over seeds, 95% bootstrap over seeds then
items) and the option minus base, paired by seed and item.

    python benchmarks/fusion_residual.py [--seeds 0 1 2] [--pre-runs runs/tds_stem]

Rows are cached in WORK/rows.jsonl (a killed run resumes). Precision: `auto` unless EVL_PRECISION is set
(the pre-trained checkpoints and `base`'s earlier fine-tunes used fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _meta import finish_meta, run_meta  # noqa: E402
from efficiency_sweep import bootstrap, paired  # noqa: E402

RESULTS = HERE / "results" / "fusion_residual.json"
CONDITIONS = {"base": [], "dual_residual": ["fusion.dual_residual"]}


def with_option(pre: Path, out: Path) -> Path:
    """`pre` with `fusion.dual_residual` added (zero-initialised projection: same outputs)."""
    import torch

    from evl.models.model import VideoLanguageModel

    if (out / "model.safetensors").is_file():
        return out
    m = VideoLanguageModel.from_pretrained(pre)
    cfg = dataclasses.replace(m.cfg, fusion=dataclasses.replace(m.cfg.fusion, dual_residual=True))
    new = VideoLanguageModel(cfg)
    missing, unexpected = new.load_state_dict(m.state_dict(), strict=False)
    if unexpected or any(not k.startswith("dual_residual.") for k in missing):
        raise RuntimeError(f"unexpected differences: missing {missing}, unexpected {unexpected}")
    assert torch.count_nonzero(new.dual_residual.weight) == 0
    new.save_pretrained(out, None)
    shutil.copyfile(pre / "tokenizer.json", out / "tokenizer.json")
    return out


def finetune(pre: Path, data: Path, out: Path, seed: int) -> dict[str, str]:
    """The quickstart's two fine-tunes from `pre` (skipped where a final checkpoint exists)."""
    from evl.quickstart import _recipe
    from evl.recipes import run_recipe

    done = {}
    for name, files in (("retrieval", ("retrieval_train.json", "retrieval_test.json")),
                        ("qa", ("qa_train.json", "qa_test.json"))):
        final = out / name / "final"
        if not (final / "model.safetensors").is_file():
            run_recipe(_recipe(f"{name}-tiny", data, out / name, files, None, [f"train.seed={seed}"]),
                       init=str(pre), evaluate=False)
        done[name] = str(final)
    return done


def evaluate(ckpts: dict[str, str], data: Path) -> dict:
    """Per-item hits: QA (with type/subtype), MC, and fine-tuned R@1 per caption."""
    import torch

    from evl.data.annotations import read_annotations
    from evl.data.answers import AnswerVocab, normalize_answer
    from evl.data.datasets import clip_key
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.tasks.evaluate import EvalSettings, _tally, embed_clips, embed_texts

    ann, videos = data / "annotations", data / "videos"
    s = EvalSettings(batch_size=32, rerank_k=0)
    out: dict = {}
    with torch.no_grad():
        qm = VideoLanguageModel.from_pretrained(ckpts["qa"])
        tok = tokenizer_for(qm.cfg, ckpts["qa"])
        vocab = AnswerVocab.from_json((Path(ckpts["qa"]) / "answers.json").read_text())
        records = read_annotations(ann / "qa_test.json")
        tally, _ = _tally(qm, records, videos, tok, s, None, "qa", vocab)
        if len(tally.preds) != len(records):
            raise RuntimeError("undecodable test clips: items would not pair across conditions")
        out["qa_hits"] = [int(normalize_answer(p) == normalize_answer(g)) for p, g in zip(tally.preds, tally.gold, strict=True)]
        out["qa_type"] = [f"{r.qtype}/{r.meta.get('subtype', '')}" for r in records]
        rm = VideoLanguageModel.from_pretrained(ckpts["retrieval"])
        mc, _ = _tally(rm, read_annotations(ann / "mc_test.json"), videos, tok, s, None, "mc")
        out["mc_hits"] = [int(x) for x in mc.right]
        ret = read_annotations(ann / "retrieval_test.json")
        clips = embed_clips(rm, ret, videos, s)
        keys = {k: i for i, k in enumerate(clips.keys)}
        caps = [(c, keys[clip_key(r)]) for r in ret for c in r.captions]
        text = embed_texts(rm, [c for c, _ in caps], tok, s).emb.float()
        sims = text @ clips.emb.T
        gold = torch.tensor([i for _, i in caps])
        out["r1_hits"] = (sims.argmax(dim=1) == gold).int().tolist()
    return out


def summarise(rows: list[dict]) -> dict:
    def hits(cond: str, key: str, mask=None) -> dict[int, np.ndarray]:
        out = {}
        for r in rows:
            if r["condition"] == cond:
                h = np.asarray(r[key], dtype=float)
                out[r["seed"]] = h if mask is None else h[mask(r)]
        return out

    summary: dict = {}
    types = sorted({t for r in rows for t in r["qa_type"]})
    groups = {"qa": ("qa_hits", None), "mc": ("mc_hits", None), "ft_t2v_r1": ("r1_hits", None)}
    for t in sorted({t.split("/")[0] for t in types}):
        groups[f"qa[{t}]"] = ("qa_hits", lambda r, t=t: np.array([x.split("/")[0] == t for x in r["qa_type"]]))
    for t in types:
        groups[f"qa[{t}]"] = ("qa_hits", lambda r, t=t: np.array([x == t for x in r["qa_type"]]))
    for name, (key, mask) in groups.items():
        e = {}
        for cond in CONDITIONS:
            h = hits(cond, key, mask)
            if h:
                e[cond] = {"mean": round(100 * float(np.mean([v.mean() for v in h.values()])), 2),
                           "ci95": bootstrap(h), "per_seed": {s: round(100 * float(v.mean()), 2) for s, v in sorted(h.items())},
                           "items": int(next(iter(h.values())).size)}
        a, b = hits("dual_residual", key, mask), hits("base", key, mask)
        if a and b:
            e["dual_residual_minus_base"] = paired(a, b)
        summary[name] = e
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pre-runs", type=Path, default=Path("runs/tds_stem"),
                    help="train_data_scale.py --work of the stem condition (its runs/ and data-1400/)")
    ap.add_argument("--work", type=Path, default=Path("runs/fusion_residual"))
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    from evl.precision import resolve_precision

    meta = run_meta(seeds=args.seeds, precision=resolve_precision("auto", "cpu").name,
                    evl_precision_env=os.environ.get("EVL_PRECISION"))
    data = args.pre_runs / "data-1400"
    missing = [p for p in [data / "annotations", *(args.pre_runs / "runs" / f"n1400-t755-c1024-s{s}-model.video.conv_stem_32"
                                                   / "final" for s in args.seeds)] if not p.exists()]
    if missing:
        raise SystemExit(f"--pre-runs {args.pre_runs}: missing {', '.join(map(str, missing))}; run "
                         "`EVL_PRECISION=fp32 python benchmarks/train_data_scale.py --train-clips 1400 --steps 755 "
                         f"--cache-mb 1024 --override model.video.conv_stem=32 --work {args.pre_runs} --seeds ...` first")
    args.work.mkdir(parents=True, exist_ok=True)
    rows_file = args.work / "rows.jsonl"
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    for seed in args.seeds:
        pre = args.pre_runs / "runs" / f"n1400-t755-c1024-s{seed}-model.video.conv_stem_32"
        for cond in CONDITIONS:
            if any(r["condition"] == cond and r["seed"] == seed for r in rows):
                continue
            if cond == "base":
                ckpts = finetune(pre / "final", data, pre / "ft", seed)
            else:
                start = with_option(pre / "final", args.work / f"pre-s{seed}-{cond}")
                ckpts = finetune(start, data, args.work / f"ft-s{seed}-{cond}", seed)
            row = {"condition": cond, "seed": seed, **evaluate(ckpts, data)}
            rows.append(row)
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(cond, seed, {k: round(100 * float(np.mean(row[k])), 2) for k in ("qa_hits", "mc_hits", "r1_hits")},
                  flush=True)
    result = {"meta": finish_meta(meta), "conditions": CONDITIONS, "summary": summarise(rows),
              "rows": [{k: v for k, v in r.items() if not k.endswith(("_hits", "_type"))} for r in rows]}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for name, e in result["summary"].items():
        print(f"{name:28s} " + "  ".join(f"{c} {e[c]['mean']:.1f} {e[c]['ci95']}" for c in CONDITIONS if c in e)
              + (f"  diff {e['dual_residual_minus_base']}" if "dual_residual_minus_base" in e else ""))


if __name__ == "__main__":
    main()
