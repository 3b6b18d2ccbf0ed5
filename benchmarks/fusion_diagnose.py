"""Diagnostics of a fusion checkpoint: does its fusion path read the video, and can its matching head learn?

The measurements behind README "EgoVLPv2", on SynthVL's test split (one caption per clip):

* `separation CKPT`  — how often the matching (VTM) head scores a caption's own clip above a random other
  clip ("easy") and above the dual encoder's best wrong clip ("hard"), and the fusion gates;
* `mlm-video CKPT`   — MLM accuracy when each word of the caption is masked in turn, with the clip's own
  video and with another clip's, per word kind (colour, shape, other): a fusion path that reads the
  video predicts colours and shapes better with the own clip;
* `vtm-probe CKPT [--negatives easy|hard] [--steps 100] [--lr 1e-3]` — train only the cross-attention
  and the VTM head of the checkpoint on streamed training batches, and report the held-out separation
  every 25 steps: how fast matching can be learnt once the towers are trained.

Usage: python benchmarks/fusion_diagnose.py {separation,mlm-video,vtm-probe} CKPT --data SYNTHVL_DIR
       [--label NAME] [--json benchmarks/results/fusion_diagnose.json]
Prints JSON lines and merges the result into the JSON file under "results" → LABEL → WHAT (vtm-probe:
WHAT = "vtm-probe <negatives>"), with the run's metadata (command, commit, CPU, precision, date, load)
beside it; other labels' and diagnostics' entries are kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fusion_diagnose.json"

COLOURS = {"red", "green", "blue", "yellow", "cyan", "purple", "orange", "white", "pink", "magenta", "gray",
           "grey", "black", "brown"}
SHAPES = {"circle", "square", "box", "triangle", "star", "ring", "disc", "disk", "ball", "cross"}


def _load(ckpt: Path):
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel

    model = VideoLanguageModel.from_pretrained(ckpt).eval()
    return model, tokenizer_for(model.cfg, ckpt)


def _batch(model, tok, data: Path, split: str, limit: int | None = None) -> tuple[dict, list]:
    """All clips of a split (first caption each) as one collated batch, and the dataset items."""
    from evl.data.annotations import read_annotations
    from evl.data.datasets import Collator, VideoTextDataset
    from evl.tasks.evaluate import clip_settings_for

    ds = VideoTextDataset(read_annotations(data / "annotations" / split), data / "videos",
                          clip_settings_for(model), text="caption")
    items = [ds[i] for i in range(len(ds) if limit is None else min(limit, len(ds)))]
    return Collator(tok, 32)(items), items


def separation(model, batch: dict) -> dict:
    """Own clip vs a random clip / vs the dual encoder's best wrong clip, by matching log-odds."""
    import torch

    n = batch["frames"].shape[0]
    with torch.no_grad():
        vf = model.video_features(batch["frames"], batch.get("frame_mask"))
        tf = model.text_features(batch["input_ids"], batch["attention_mask"])
        sim = tf.emb @ vf.emb.T
        easy = (torch.arange(n) + torch.randint(1, n, (n,), generator=torch.Generator().manual_seed(0))) % n
        hard = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf")).argmax(1)
        rows = torch.arange(n)

        def log_odds(videos: torch.Tensor) -> torch.Tensor:
            lg = model.score_pairs(vf.select(videos), tf.select(rows))
            return lg[:, 1] - lg[:, 0]

        own = log_odds(rows)
        return {"beats_easy": 100 * float((own > log_odds(easy)).float().mean()),
                "beats_hard": 100 * float((own > log_odds(hard)).float().mean()),
                "dual_r1": 100 * float((sim.argmax(1) == rows).float().mean())}


def mlm_video(model, tok, batch: dict) -> dict:
    """MLM accuracy per word kind with the own clip and with the next clip's video."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[0]
    counts: dict[str, list[int]] = {}
    with torch.no_grad():
        vf = model.video_features(batch["frames"], batch.get("frame_mask"))
        for pos in range(1, ids.shape[1]):
            valid = (mask[:, pos] == 1) & ~torch.isin(ids[:, pos], torch.tensor(sorted(tok.special_ids)))
            if not valid.any():
                continue
            masked = ids.clone()
            masked[:, pos] = tok.mask_id
            labels = torch.full_like(ids, -100)
            labels[valid, pos] = ids[valid, pos]
            tf = model.text_features(masked, mask)
            for which, order in (("own", torch.arange(n)), ("other", torch.roll(torch.arange(n), 1))):
                logits, targets = model.mlm_logits(model.fuse(vf.select(order), tf).text_tokens, labels)
                for t, ok in zip(targets.tolist(), (logits.argmax(-1) == targets).tolist(), strict=True):
                    word = tok.decode([t]).strip()
                    kind = "colour" if word in COLOURS else "shape" if word in SHAPES else "other"
                    c = counts.setdefault(f"{kind}_{which}", [0, 0])
                    c[0] += int(ok)
                    c[1] += 1
    return {k: {"accuracy": round(100 * a / b, 1), "count": b} for k, (a, b) in sorted(counts.items())}


def vtm_probe(model, tok, data: Path, negatives: str, steps: int, lr: float, batch_size: int = 32) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from evl.data.datasets import Collator

    test, _ = _batch(model, tok, data, "retrieval_test.json")
    _, items = _batch(model, tok, data, "retrieval_train.json")
    frozen = copy.deepcopy(model).eval()   # the towers' dual similarity picks the hard negatives
    probe = copy.deepcopy(model).train()
    params = [p for n, p in probe.named_parameters() if "cross_attn" in n or "vtm_head" in n or n.startswith("fusion.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    collate = Collator(tok, 32)
    curve = []
    for step in range(steps + 1):
        if step % 25 == 0:
            probe.eval()
            curve.append({"step": step, "negatives": negatives, **separation(probe, test)})
            print(json.dumps(curve[-1]), flush=True)
            probe.train()
        if step == steps:
            break
        b = collate([items[i] for i in torch.randperm(len(items), generator=g)[:batch_size].tolist()])
        n = b["frames"].shape[0]
        if negatives == "easy":
            neg = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n
        else:
            with torch.no_grad():
                sim = frozen.encode_text(b["input_ids"], b["attention_mask"]) @ frozen.encode_video(b["frames"]).T
                sim = (sim * frozen.logit_scale()).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
            neg = torch.multinomial(sim.softmax(1), 1, generator=g).squeeze(1)
        vf = probe.video_features(b["frames"], b.get("frame_mask"))
        tf = probe.text_features(b["input_ids"], b["attention_mask"])
        rows = torch.arange(n)
        logits = probe.score_pairs(vf.select(torch.cat([rows, rows])), tf.select(torch.cat([rows, neg])))
        loss = F.cross_entropy(logits, torch.cat([torch.ones(n), torch.zeros(n)]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["separation", "mlm-video", "vtm-probe"])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="a SynthVL folder (evl synth)")
    ap.add_argument("--negatives", choices=["easy", "hard"], default="easy")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--label", default=None, help="the checkpoint's name in the JSON (default: its path)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    # separation draws its random clips from a generator seeded 0, vtm-probe its batches too
    meta = run_meta(seeds=[0], precision="fp32")   # diagnostics run without autocast
    torch.manual_seed(0)
    model, tok = _load(args.checkpoint)
    if args.what == "vtm-probe":
        key = f"vtm-probe {args.negatives}"
        result: object = {"lr": args.lr, "steps": args.steps,
                          "curve": vtm_probe(model, tok, args.data, args.negatives, args.steps, args.lr)}
    else:
        key = args.what
        batch, _ = _batch(model, tok, args.data, "retrieval_test.json")
        if args.what == "separation":
            gates = {n: round(float(p.detach()), 4) for n, p in model.named_parameters() if n.endswith(".gate")}
            result = {**separation(model, batch), "gates": gates}
        else:
            result = mlm_video(model, tok, batch)
        print(json.dumps(result))
    store = json.loads(args.json.read_text()) if args.json.is_file() else {"results": {}}
    label = args.label or str(args.checkpoint)
    store["results"].setdefault(label, {})[key] = {"meta": finish_meta(meta), "checkpoint": str(args.checkpoint),
                                                   "data": str(args.data), "result": result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(store, indent=2))
    print(f"wrote {args.json} ({label} / {key})")


if __name__ == "__main__":
    main()
