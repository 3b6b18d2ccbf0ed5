"""SynthVL: the built-in procedural video-language benchmark (`evl synth`).

There is no real video-text corpus on an offline CPU machine, so evl ships a generator whose clips
are hard enough for each efficiency technique to matter and easy enough for a tiny model to learn:

* clips of T frames at S×S px: 1–3 objects (5 shapes × 6 saturated colours, unique colour and shape
  within a clip) on a grey-ish textured, noisy background with small drifting distractor specks, so
  most patches carry no meaning (what token sparsification and MAE masking exploit);
* each object performs one of 10 actions in its own time window; windows never overlap, so the
  events have a temporal order, and ~40% of them last only 2–4 frames (uniform sampling of a few
  frames can miss them — what frame selection exploits);
* captions, open-ended QA and multiple-choice options are generated from the structured metadata;
* a held-out compositional test split: a few colour×shape×verb triples (chosen from the seed) never
  occur in train/val and occur in every "compositional" test clip.

Splits, by clip index: the first ~70% train, next ~10% val, last ~20% test; the first half of the
test clips (rounded up) are compositional (records carry `"compositional": true`), the rest ordinary.

Every clip depends only on (seed, index, config, compositional flag) through independent random
streams (plan, render, captions, QA, multiple choice), so any subset can be regenerated in memory and
files can be rendered and encoded in worker processes with byte-identical results.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evl.data import MAX_FRAMES, MAX_SYNTH_CLIPS, MAX_SYNTH_SIZE
from evl.data.synth_motion import event_amount, event_windows, place_objects
from evl.data.synth_render import (
    COLOURS,
    SHAPES,
    render_frames,
)
from evl.data.synth_text import (
    NUMBER_WORDS,
    VERB_ANSWERS,
    VERB_PHRASES,
    VERBS,
    CaptionStyle,
    answer_vocabulary,
    make_captions,
    make_moment_captions,
    make_multiple_choice,
    make_questions,
    valid_verbs,
)

GENERATOR_VERSION = "synthvl-1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
# independent random streams per clip: changing the text templates never changes the pixels
_PLAN, _RENDER, _CAPTIONS, _QA, _MC = range(5)


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings. Defaults give the benchmark the quickstart is tuned for."""

    frames: int = 16
    size: int = 64
    max_objects: int = 3
    fps: int = 8
    captions_per_clip: int = 5
    mc_options: int = 5
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    compositional_fraction: float = 0.5  # share of test clips that contain a held-out triple
    heldout_combinations: int = 6
    short_event_prob: float = 0.4  # probability that an event lasts only 2–4 frames
    noise_std: float = 4.0  # per-frame pixel noise (the background also has static texture noise)
    gop: int = 4
    crf: int = 18
    min_objects: int = 1
    event_frames: tuple[int, int] | None = None  # length range of an event that is not short; None: T/4..T/2
    long_text: bool = False  # one-moment captions, event-targeted and order questions (`long_config`)

    def __post_init__(self) -> None:
        if not 4 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"frames must be between 4 (events need at least 2 frames) and {MAX_FRAMES} (the most "
                             f"evl reads per clip), got {self.frames}")
        if not 16 <= self.size <= MAX_SYNTH_SIZE or self.size % 2:
            raise ValueError(f"size must be even and between 16 and {MAX_SYNTH_SIZE} pixels (H.264 yuv420p needs "
                             f"even sides), got {self.size}")
        if not 1 <= self.max_objects <= len(SHAPES):
            raise ValueError(f"max_objects must be in 1..{len(SHAPES)} (shapes are unique per clip), "
                             f"got {self.max_objects}")
        if not 1 <= self.min_objects <= self.max_objects or 2 * self.min_objects > self.frames:
            raise ValueError(f"min_objects must be in 1..max_objects ({self.max_objects}) with 2 frames per event "
                             f"({self.frames} frames), got {self.min_objects}")
        if self.event_frames is not None and not 2 <= self.event_frames[0] <= self.event_frames[1] <= self.frames:
            raise ValueError(f"event_frames must be (lo, hi) with 2 <= lo <= hi <= frames ({self.frames}), "
                             f"got {self.event_frames}")
        if self.captions_per_clip < 1 or self.mc_options < 2:
            raise ValueError("captions_per_clip must be >= 1 and mc_options >= 2, "
                             f"got {self.captions_per_clip} and {self.mc_options}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or sum(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions must be 3 non-negative numbers (train, val, test), "
                             f"got {self.split_fractions}")


@dataclass
class SynthClip:
    """One generated clip: frames (T, H, W, 3) uint8, structured metadata, and its captions."""

    frames: np.ndarray | None
    meta: dict
    captions: list[str]
    caption_styles: list[CaptionStyle] = field(default_factory=list, repr=False)
    moments: list[list[int]] = field(default_factory=list, repr=False)  # long clips: [start, end) per caption


@dataclass
class SynthVL:
    """An in-memory SynthVL benchmark: clips plus exactly the annotation dicts `write_synthvl` writes."""

    config: SynthConfig
    seed: int
    clips: list[SynthClip]
    annotations: dict[str, list]  # file name (e.g. "qa_test.json") -> records
    meta: dict  # the contents of meta.json

    def split(self, name: str) -> list[SynthClip]:
        """The clips of split `name` ("train", "val" or "test")."""
        return [c for c in self.clips if c.meta["split"] == name]


# ----------------------------------------------------------------------------- planning


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def clip_id(index: int) -> str:
    return f"clip_{index:05d}"


def heldout_combinations(seed: int, count: int = 6) -> list[tuple[str, str, str]]:
    """The colour×shape×verb triples reserved for the compositional test split, chosen from the seed.

    No two share a colour-shape pair or a verb more than needed, so train still sees every colour,
    shape and verb (only these exact combinations are missing).
    """
    rng = np.random.default_rng([seed])
    triples = [(c, s, v) for c in COLOURS for s in SHAPES for v in valid_verbs(s)]
    order = rng.permutation(len(triples))
    chosen: list[tuple[str, str, str]] = []
    pairs: set[tuple[str, str]] = set()
    for i in order:
        c, s, v = triples[int(i)]
        if (c, s) in pairs or sum(v == x[2] for x in chosen) >= 1 + len(chosen) // len(VERBS):
            continue
        chosen.append((c, s, v))
        pairs.add((c, s))
        if len(chosen) == count:
            break
    return sorted(chosen)


def split_plan(clips: int, cfg: SynthConfig) -> list[tuple[str, bool]]:
    """(split, compositional) for each clip index: train first, then val, then test.

    With ≥ 3 clips every split gets at least one clip, so tiny runs still exercise all files.
    """
    total = sum(cfg.split_fractions)
    n_val = round(clips * cfg.split_fractions[1] / total)
    n_test = round(clips * cfg.split_fractions[2] / total)
    if clips >= 3:
        n_val = max(n_val, 1) if cfg.split_fractions[1] > 0 else 0
        n_test = max(n_test, 1) if cfg.split_fractions[2] > 0 else 0
    n_train = clips - n_val - n_test
    n_comp = math.ceil(n_test * cfg.compositional_fraction)
    plan = [("train", False)] * n_train + [("val", False)] * n_val
    plan += [("test", k < n_comp) for k in range(n_test)]
    return plan


def _sample_objects(cfg: SynthConfig, compositional: bool, heldout: list[tuple[str, str, str]],
                    rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(colour, shape, verb) per object: unique colours and shapes; held-out triples only if compositional."""
    n = int(rng.integers(cfg.min_objects, min(cfg.max_objects, cfg.frames // 2) + 1))
    forced = heldout[int(rng.integers(len(heldout)))] if compositional and heldout else None
    colours = [c for c in COLOURS if forced is None or c != forced[0]]
    shapes = [s for s in SHAPES if forced is None or s != forced[1]]
    picks_c = [colours[int(i)] for i in rng.permutation(len(colours))]
    picks_s = [shapes[int(i)] for i in rng.permutation(len(shapes))]
    banned = set(heldout)
    triples = []
    for k in range(n - (forced is not None)):
        c, s = picks_c[k], picks_s[k]
        verbs = [v for v in valid_verbs(s) if (c, s, v) not in banned]
        triples.append((c, s, verbs[int(rng.integers(len(verbs)))]))
    if forced is not None:
        triples.insert(int(rng.integers(n)), forced)
    return triples


def plan_clip(cfg: SynthConfig, seed: int, index: int, compositional: bool = False,
              heldout: list[tuple[str, str, str]] | None = None) -> dict:
    """The structured metadata of clip `index`: objects (colour, shape, size, start, rgb) and events.

    Events are in time order; `start` is inclusive and `end` exclusive (frames start..end-1).
    """
    if heldout is None:
        heldout = heldout_combinations(seed, cfg.heldout_combinations)
    rng = _rng(seed, index, _PLAN)
    triples = _sample_objects(cfg, compositional, heldout, rng)
    lo, hi = max(2, round(0.11 * cfg.size)), max(2, round(0.15 * cfg.size))
    objs = [{"colour": c, "shape": s, "radius": int(rng.integers(lo, hi + 1)),
             "rgb": [int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[c]]}
            for c, s, _ in triples]
    order = rng.permutation(len(triples))  # which object acts first, second, ...
    windows = event_windows(len(triples), cfg.frames, cfg.short_event_prob, rng, cfg.event_frames)
    events = [None] * len(triples)
    for (start, end), j in zip(windows, order, strict=True):
        c, s, v = triples[int(j)]
        events[int(j)] = {"object": int(j), "verb": v, "noun": s, "colour": c, "start": start, "end": end,
                          "amount": event_amount(v, s, cfg.size, rng)}
    place_objects(objs, events, cfg.size, rng)
    objects = [{"id": j, **{k: o[k] for k in ("colour", "shape", "radius", "x", "y", "rgb")}}
               for j, o in enumerate(objs)]
    return {"id": clip_id(index), "video": f"{clip_id(index)}.mp4", "index": index,
            "compositional": bool(compositional), "objects": objects,
            "events": sorted(events, key=lambda e: e["start"])}


def long_config(frames: int = 48, size: int = 64, **overrides) -> SynthConfig:
    """Long clips (`evl synth --long`): 3–5 events in sequence, each 2–8 frames with idle time between,
    so the answer to an event-targeted question lives in a few of the T frames (what frame selection is
    for); captions tell one moment each, and QA adds event-targeted and order questions (with the
    frame windows that hold the answer). 5 events at most: each object acts once and shapes are unique."""
    if not 24 <= frames <= MAX_FRAMES:
        raise ValueError(f"long clips need between 24 and {MAX_FRAMES} frames (48–64 recommended), got {frames}")
    return SynthConfig(**{"frames": frames, "size": size, "max_objects": 5, "min_objects": 3, "event_frames": (4, 8),
                          "long_text": True, **overrides})


def generate_clip(cfg: SynthConfig, seed: int, index: int, compositional: bool = False,
                  heldout: list[tuple[str, str, str]] | None = None, render: bool = True) -> SynthClip:
    """Generate clip `index` in memory; identical for identical (cfg, seed, index, compositional).

    `render=False` skips the pixels (frames=None) when only the text and metadata are needed.
    """
    meta = plan_clip(cfg, seed, index, compositional, heldout)
    frames = render_clip(cfg, seed, meta) if render else None
    if cfg.long_text:   # each caption tells one moment; `moments` holds its event's frame window
        caps = make_moment_captions(meta, cfg.captions_per_clip, _rng(seed, index, _CAPTIONS))
        return SynthClip(frames=frames, meta=meta, captions=[t for t, _ in caps], moments=[m for _, m in caps])
    caps = make_captions(meta, cfg.captions_per_clip, _rng(seed, index, _CAPTIONS))
    return SynthClip(frames=frames, meta=meta, captions=[t for t, _ in caps], caption_styles=[s for _, s in caps])


def render_clip(cfg: SynthConfig, seed: int, meta: dict) -> np.ndarray:
    """Frames (T, S, S, 3) uint8 of a planned clip (its own random stream: background, noise)."""
    return render_frames(meta, cfg.frames, cfg.size, cfg.noise_std, _rng(seed, meta["index"], _RENDER))


# ----------------------------------------------------------------------------- annotations


def _validate(clips: int, seed: int) -> None:
    if not isinstance(clips, (int, np.integer)) or not 1 <= clips <= MAX_SYNTH_CLIPS:
        raise ValueError(f"clips must be an integer between 1 and {MAX_SYNTH_CLIPS}, got {clips!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _plan_all(clips: int, seed: int, cfg: SynthConfig, render: bool) -> list[SynthClip]:
    heldout = heldout_combinations(seed, cfg.heldout_combinations)
    out = []
    for index, (split, comp) in enumerate(split_plan(clips, cfg)):
        clip = generate_clip(cfg, seed, index, comp, heldout, render=render)
        clip.meta["split"] = split
        out.append(clip)
    return out


def build_annotations(clips: list[SynthClip], seed: int, cfg: SynthConfig) -> dict[str, list]:
    """Every annotation file's records, keyed by file name (MSRVTT/MSVD-style JSON layouts)."""
    ann: dict[str, list] = {"pretrain.json": []}
    for split in SPLITS:
        for task in ("retrieval", "qa", "mc"):
            ann[f"{task}_{split}.json"] = []
    for clip in clips:
        m = clip.meta
        split, video = m["split"], m["video"]
        extra = {"compositional": m["compositional"]} if split == "test" else {}
        moments = [{"moment": w} for w in clip.moments] or [{}] * len(clip.captions)
        if split == "train":
            verbs = sorted({e["verb"] for e in m["events"]})
            nouns = sorted({e["noun"] for e in m["events"]})
            ann["pretrain.json"] += [{"video": video, "caption": c, "verbs": verbs, "nouns": nouns, **w}
                                     for c, w in zip(clip.captions, moments, strict=True)]
        ret = {"moments": clip.moments} if clip.moments else {}
        ann[f"retrieval_{split}.json"].append({"video": video, "caption": list(clip.captions), **ret, **extra})
        for q in make_questions(m, _rng(seed, m["index"], _QA), long=cfg.long_text):
            ann[f"qa_{split}.json"].append({"video": video, **q, **extra})
        mc_rng = _rng(seed, m["index"], _MC)
        # long clips: options are whole-clip captions (one style drawn first from the MC stream)
        styled = (make_captions(m, 1, mc_rng) if cfg.long_text
                  else list(zip(clip.captions, clip.caption_styles, strict=True)))
        mc = make_multiple_choice(m, styled, cfg.mc_options, mc_rng)
        ann[f"mc_{split}.json"].append({"video": video, **mc, **extra})
    ann["clips.json"] = [c.meta for c in clips]
    return ann


def _majority(records: list[dict]) -> dict:
    if not records:
        return {"answer": None, "fraction": 0.0}
    answers, counts = np.unique([r["answer"] for r in records], return_counts=True)
    k = int(np.argmax(counts))
    return {"answer": str(answers[k]), "fraction": round(float(counts[k]) / len(records), 4)}


def build_meta(clips: list[SynthClip], seed: int, cfg: SynthConfig, ann: dict[str, list]) -> dict:
    """meta.json: everything a reader needs to interpret the files, and the baselines to beat."""
    splits = {s: sum(c.meta["split"] == s for c in clips) for s in SPLITS}
    qa_types: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        for r in ann[f"qa_{s}.json"]:
            qa_types.setdefault(s, {}).setdefault(r["type"], 0)
            qa_types[s][r["type"]] += 1
    return {
        "generator": GENERATOR_VERSION, "seed": int(seed), "clips": len(clips), "config": asdict(cfg),
        "frames": cfg.frames, "size": cfg.size, "fps": cfg.fps,
        "colours": {k: list(v) for k, v in COLOURS.items()}, "shapes": list(SHAPES), "verbs": list(VERBS),
        "verb_phrases": {k: list(v) for k, v in VERB_PHRASES.items()}, "verb_answers": VERB_ANSWERS,
        "answer_vocabulary": answer_vocabulary(cfg.max_objects),
        "number_words": list(NUMBER_WORDS[1:cfg.max_objects + 1]),
        "heldout_combinations": [{"colour": c, "shape": s, "verb": v}
                                 for c, s, v in heldout_combinations(seed, cfg.heldout_combinations)],
        "splits": splits,
        "compositional_test_clips": sum(c.meta["compositional"] for c in clips),
        "split_rule": "by clip index: train first, then val, then test; the first ceil(compositional_fraction "
                      "* n_test) test clips are compositional (contain a held-out colour-shape-verb triple, "
                      "which never occurs in train/val)",
        "frame_windows": "event start is inclusive, end exclusive",
        "qa_types": qa_types,
        "qa_majority": {s: _majority(ann[f"qa_{s}.json"]) for s in SPLITS},
        "retrieval_chance_r1": {s: (1.0 / n if n else None) for s, n in splits.items()},
        "files": sorted(ann),
    }


def generate_synthvl(clips: int, seed: int = 0, cfg: SynthConfig | None = None, render: bool = True) -> SynthVL:
    """The whole benchmark in memory (no files): clips with frames plus the annotation records."""
    cfg = cfg or SynthConfig()
    _validate(clips, seed)
    items = _plan_all(clips, seed, cfg, render)
    ann = build_annotations(items, seed, cfg)
    return SynthVL(config=cfg, seed=seed, clips=items, annotations=ann, meta=build_meta(items, seed, cfg, ann))


# ----------------------------------------------------------------------------- files


def dumps_records(records: list | dict) -> str:
    """JSON with one record per line: valid JSON, readable, and diff-friendly; stable bytes."""
    if isinstance(records, list):
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        return "[\n" + body + "\n]\n" if records else "[]\n"
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def _encode_chunk(args: tuple) -> int:
    """Worker: render and encode a chunk of planned clips (pure function of its arguments)."""
    from evl.data.video_writer import write_video

    cfg, seed, metas, videos_dir = args
    for meta in metas:
        write_video(Path(videos_dir) / meta["video"], render_clip(cfg, seed, meta), fps=cfg.fps,
                    gop=cfg.gop, crf=cfg.crf)
    return len(metas)


def _default_workers(clips: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if clips < 16 else max(1, min(cores, 8))


def encode_videos(metas: list[dict], seed: int, cfg: SynthConfig, videos_dir: Path, workers: int) -> None:
    """Render + encode every clip, in `workers` processes when > 1 (each file depends only on its clip)."""
    videos_dir.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        _encode_chunk((cfg, seed, metas, str(videos_dir)))
        return
    import multiprocessing as mp

    n_chunks = min(len(metas), workers * 4)
    chunks = [(cfg, seed, metas[k::n_chunks], str(videos_dir)) for k in range(n_chunks)]
    # fork where available: workers use only numpy + PyAV (never torch, whose threads do not survive
    # a fork), and unlike spawn it works when the caller's __main__ is not importable (stdin, notebooks)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        for _ in pool.imap_unordered(_encode_chunk, chunks):
            pass


def write_synthvl(out_dir: str | Path, clips: int = 200, seed: int = 0, frames: int = 16, size: int = 64,
                  workers: int | None = None, cfg: SynthConfig | None = None) -> dict:
    """Write SynthVL to `out_dir`: videos/{id}.mp4, annotations/*.json, meta.json. Returns a summary.

    The same arguments give byte-identical annotation files and videos whatever `workers` is.
    `cfg`, when given, overrides `frames` and `size`.
    """
    cfg = cfg or SynthConfig(frames=frames, size=size)
    _validate(clips, seed)
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0 or 1 = in-process), got {workers}")
    start = time.perf_counter()
    out = Path(out_dir)
    data = generate_synthvl(clips, seed, cfg, render=False)
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    for name, records in data.annotations.items():
        (ann_dir / name).write_text(dumps_records(records), encoding="utf-8")
    (out / "meta.json").write_text(dumps_records(data.meta), encoding="utf-8")
    n_workers = _default_workers(clips) if workers is None else max(1, workers)
    encode_videos([c.meta for c in data.clips], seed, cfg, out / "videos", n_workers)
    return {
        "out_dir": str(out), "clips": clips, "seed": seed, "frames": cfg.frames, "size": cfg.size,
        "splits": data.meta["splits"], "compositional_test_clips": data.meta["compositional_test_clips"],
        "records": {name: len(r) for name, r in sorted(data.annotations.items())},
        "heldout_combinations": data.meta["heldout_combinations"],
        "qa_majority": data.meta["qa_majority"], "workers": n_workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
