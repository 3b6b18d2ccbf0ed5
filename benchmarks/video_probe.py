"""What does the video tower encode? Linear probes for colour, shape and action on one-event SynthVL clips.

Issue 23's measurement found the dual encoder telling captions apart by colour (98% pairwise) but not by
shape, action or event order (50%). This asks whether the information is in the video features at all:
for each checkpoint, the clips that show exactly one event are embedded (the dual embedding the
contrastive loss sees, and the mean of the tower's final tokens), and a multinomial logistic regression
(fp32, L-BFGS on standardised features, L2 1e-3) is fitted on a random 60% of them and scored on
the other 40%, 5 splits; the majority class is the baseline. A random-init tower is the floor: its
tokens still carry colour statistics, but not what training added.

Usage: python benchmarks/video_probe.py CKPT [CKPT ...] --data SYNTHVL_DIR [--random-init LIKE_CKPT]
Results: benchmarks/results/video_probe.json (one row per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = ("colour", "noun", "verb")


def features(model, data: Path, metas: list[dict]) -> dict[str, np.ndarray]:
    import torch

    from evl.data.annotations import Record
    from evl.tasks.evaluate import EvalSettings, embed_clips

    records = [Record(video=m["video"]) for m in metas]
    with torch.no_grad():
        g = embed_clips(model.eval(), records, data / "videos", EvalSettings(batch_size=32, device="cpu"), keep_tokens=True)
    assert len(g.keys) == len(records), "every clip decodes"
    tokens = g.features.tokens.float()
    return {"embedding": g.emb.float().numpy(), "token_mean": tokens.mean(1).numpy()}


def _fit(x, y, classes: int):
    """Multinomial logistic regression (L2 1e-3) by L-BFGS: weights (D, C) and bias (C,)."""
    import torch

    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe(x: np.ndarray, y: np.ndarray, splits: int = 5) -> dict:
    import torch

    classes, y = np.unique(y, return_inverse=True)
    accs, majority = [], []
    for s in range(splits):
        idx = np.random.default_rng(s).permutation(len(y))
        cut = int(0.6 * len(y))
        tr, te = idx[:cut], idx[cut:]
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
        yt = torch.tensor(y)
        w, b = _fit(xt[tr], yt[tr], len(classes))
        with torch.no_grad():
            accs.append(float(((xt[te] @ w + b).argmax(1) == yt[te]).float().mean()))
        majority.append(float(np.mean(y[te] == np.bincount(y[tr]).argmax())))
    return {"accuracy": round(100 * float(np.mean(accs)), 1), "accuracy_per_split": [round(100 * a, 1) for a in accs],
            "majority": round(100 * float(np.mean(majority)), 1), "classes": len(classes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="a SynthVL folder (annotations/clips.json, videos/)")
    ap.add_argument("--random-init", type=Path, default=None, help="also probe an untrained model of this checkpoint's config")
    ap.add_argument("--json", type=Path, default=RESULTS / "video_probe.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _meta import finish_meta, run_meta

    from evl.models.model import VideoLanguageModel, build_model

    meta = run_meta(seeds=[0], precision="fp32")
    metas = [m for m in json.loads((args.data / "annotations" / "clips.json").read_text()) if len(m["events"]) == 1]
    labels = {k: np.array([m["events"][0][k] for m in metas]) for k in LABELS}
    models = [(str(c), lambda c=c: VideoLanguageModel.from_pretrained(c)) for c in args.checkpoints]
    if args.random_init is not None:
        def untrained():
            torch.manual_seed(0)
            return build_model(VideoLanguageModel.from_pretrained(args.random_init).cfg)
        models.insert(0, (f"random init ({args.random_init})", untrained))
    rows = []
    for name, load in models:
        feats = features(load(), args.data, metas)
        row = {"checkpoint": name, "clips": len(metas)}
        for space, x in feats.items():
            row[space] = {k: probe(x, labels[k]) for k in LABELS}
        rows.append(row)
        print(json.dumps({"checkpoint": name, **{s: {k: v["accuracy"] for k, v in row[s].items()} for s in feats}}), flush=True)
    args.json.write_text(json.dumps({"meta": finish_meta(meta), "protocol": __doc__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
