"""`evl.load`: use any model evl writes from your own Python code (open_clip / LAVIS style).

    import evl

    model = evl.load("runs/quickstart/retrieval/final")   # backend: "torch" (default), "onnx", "onnx-int8"
    videos = model.encode_video(["a.mp4", ("b.mp4", 2.0, 6.5)])   # files, or (file, start s, end s) windows
    texts = model.encode_text(["a red circle moves left", "a square grows"])
    model.similarity(texts, videos)                      # (2 texts, 2 videos) cosine similarities
    evl.load("runs/quickstart/qa/final").answer("a.mp4", "what colour is the square?")

What each kind of folder can do (`model.kind`, `model.can(...)`):

    dual       evl pretrain / finetune of a dual-encoder model      encode_video, encode_text, similarity
    fusion     … with a cross-modal part (VTM / MLM)                 + match (the fusion match probability)
    qa         a fusion model fine-tuned on open-ended QA            + answer
    frame_qa   evl vlap train (k of N frames, QFormer)              answer only
    onnx       evl export … --format onnx (video + text encoders)   encode_video, encode_text, similarity

Preprocessing is built in and is the one evl trains and evaluates with: `num_frames` frames sampled
uniformly over the video (or over the window), each segment's middle frame; the short side resized to
the model's image size and centre-cropped; RGB scaled to [0, 1] and normalised with ImageNet's mean
and std; a video shorter than `num_frames` frames is padded and masked. `preprocess(video)` returns
exactly what `encode_video` feeds the model, so a tensor batch of such frames can be passed directly.
Embeddings are L2-normalised float32 tensors on the CPU.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from evl.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from evl.data.text import Tokenizer

__all__ = ["BACKENDS", "KINDS", "Answer", "EvlModel", "VideoInput", "evaluate_folder", "load"]

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
KINDS: tuple[str, ...] = ("dual", "fusion", "qa", "frame_qa", "onnx")
EXPORT_FILE = "export.json"        # what `evl export` writes beside the .onnx files
MAX_TEXT_LEN = 32                  # tokens per text, as training and evaluation use (EvalSettings)
ONNX_FILES = {"onnx": ("video.onnx", "text.onnx"), "onnx-int8": ("video.int8.onnx", "text.int8.onnx")}
#: a video file, or (file, start seconds, end seconds) for a window of it
VideoInput = str | Path | tuple
_ABILITIES = {
    "dual": {"encode_video", "encode_text", "similarity"},
    "fusion": {"encode_video", "encode_text", "similarity", "match"},
    "qa": {"encode_video", "encode_text", "similarity", "match", "answer"},
    "frame_qa": {"answer"},
    "onnx": {"encode_video", "encode_text", "similarity"},
}
_WHAT_CAN = {
    "encode_video": "a dual/fusion/QA checkpoint (evl pretrain, evl finetune) or an ONNX export",
    "encode_text": "a dual/fusion/QA checkpoint (evl pretrain, evl finetune) or an ONNX export",
    "similarity": "a dual/fusion/QA checkpoint or an ONNX export",
    "match": "a checkpoint with a fusion part (pre-trained with VTM/MLM or fine-tuned for retrieval with VTM)",
    "answer": "a QA checkpoint (evl finetune qa-tiny) or a frame-QA one (evl vlap train)",
}


@dataclass
class Answer:
    """An open-ended answer, its probability, the next best answers, and (frame QA) the frames read."""

    answer: str
    score: float
    alternatives: list[tuple[str, float]]
    frames: list[dict[str, Any]] | None = None


class EvlModel:
    """A loaded evl model with its preprocessing and tokenizer; see the module docstring."""

    def __init__(self, path: Path, kind: str, backend: str, num_frames: int, image_size: int,
                 tokenizer: Tokenizer, max_text_len: int, embed_dim: int | None, torch_model: torch.nn.Module | None = None,
                 sessions: tuple[Any, Any] | None = None, vocab=None, fingerprint: str | None = None):
        self.path, self.kind, self.backend, self.embed_dim = path, kind, backend, embed_dim
        self._fingerprint = fingerprint
        self.num_frames, self.image_size, self.max_text_len = num_frames, image_size, max_text_len
        self.tokenizer, self.vocab = tokenizer, vocab
        self.model = torch_model           # the torch module (None for an ONNX export)
        self._sessions = sessions

    def __repr__(self) -> str:
        return (f"EvlModel(kind={self.kind!r}, backend={self.backend!r}, path={str(self.path)!r}, "
                f"num_frames={self.num_frames}, image_size={self.image_size})")

    @property
    def weights_fingerprint(self) -> str:
        """sha1 of the weights and tokenizer files this model came from (an export: its source checkpoint's)."""
        if self._fingerprint is None:
            from evl.checkpoint import model_fingerprint

            self._fingerprint = model_fingerprint(self.path)
        return self._fingerprint

    def can(self, ability: str) -> bool:
        """Whether this model can `ability` ("encode_video", "encode_text", "similarity", "match", "answer")."""
        return ability in _ABILITIES[self.kind]

    def _need(self, ability: str) -> None:
        if not self.can(ability):
            raise ConfigError(f"{self.path} is a {self.kind!r} model ({_describe(self.kind)}); it cannot {ability}: "
                              f"that needs {_WHAT_CAN[ability]}")

    # ------------------------------------------------------------------ preprocessing

    def preprocess(self, video: VideoInput, num_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A video file (or (file, start s, end s)) → normalised frames (T, 3, S, S) and frame mask (T,)."""
        from evl.data.transforms import VideoTransform
        from evl.data.video import load_clip

        path, start, end = _video_input(video)
        clip = load_clip(path, num_frames or self.num_frames, "uniform", start=start, end=end)
        return VideoTransform(size=self.image_size, train=False)(clip.frames), clip.frame_mask

    def tokenize(self, texts: Sequence[str]):
        """Token ids and attention mask (B, L) of `texts`, as the model was trained with."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) for t in texts):
            raise ConfigError("texts must be a non-empty list of strings")
        return self.tokenizer(list(texts), max_length=self.max_text_len)

    # ------------------------------------------------------------------ the dual encoder

    @torch.no_grad()
    def encode_video(self, videos: VideoInput | Sequence[VideoInput] | torch.Tensor,
                     frame_mask: torch.Tensor | None = None, batch_size: int = 16) -> torch.Tensor:
        """(N, E) unit vectors of N videos: files / (file, start, end) windows (decoded and preprocessed
        here; a file that cannot be decoded is a VideoDecodeError naming it), or a tensor of
        preprocessed frames (N, T, 3, S, S) with an optional (N, T) frame mask."""
        self._need("encode_video")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        if isinstance(videos, torch.Tensor):
            if videos.dim() != 5 or not len(videos):
                raise ConfigError(f"a frames tensor must be (N, T, 3, S, S) preprocessed frames with N >= 1, got shape "
                                  f"{tuple(videos.shape)}; pass file paths, or model.preprocess(path) stacked")
            if self.kind == "onnx" and videos.shape[1] != self.num_frames:
                raise ConfigError(f"this export reads {self.num_frames} frames per clip, the tensor has {videos.shape[1]}; "
                                  f"preprocess with model.preprocess (or re-export with --frames {videos.shape[1]})")
            mask = frame_mask if frame_mask is not None else torch.ones(videos.shape[:2], dtype=torch.bool)
            return torch.cat([self._video_batch(videos[i:i + batch_size], mask[i:i + batch_size])
                              for i in range(0, len(videos), batch_size)])
        items = [videos] if isinstance(videos, (str, Path)) or _is_window(videos) else list(videos)
        if not items:
            raise ConfigError("no videos given")
        out = []
        for i in range(0, len(items), batch_size):
            clips = [self.preprocess(v) for v in items[i:i + batch_size]]
            out.append(self._video_batch(torch.stack([c[0] for c in clips]), torch.stack([c[1] for c in clips])))
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, E) unit vectors of N texts."""
        self._need("encode_text")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, max(len(texts), 1), batch_size):
            tok = self.tokenize(texts[i:i + batch_size])
            out.append(self._text_batch(tok.input_ids, tok.attention_mask))
        return torch.cat(out)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (Na, Nb) between two sets of embeddings (e.g. texts × videos)."""
        self._need("similarity")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ConfigError(f"similarity needs two (N, E) embedding matrices of one width, got {tuple(a.shape)} "
                              f"and {tuple(b.shape)}")
        return torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(b.float(), dim=-1).T

    def _video_batch(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._sessions is not None:
            out = self._sessions[0].run(None, {"frames": frames.float().numpy(), "frame_mask": mask.bool().numpy()})
            return torch.from_numpy(out[0]).float()
        return self.model.encode_video(frames, None if bool(mask.all()) else mask).float()

    def _text_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._sessions is not None:
            out = self._sessions[1].run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            return torch.from_numpy(out[0]).float()
        return self.model.encode_text(ids, mask).float()

    # ------------------------------------------------------------------ the fusion part

    @torch.no_grad()
    def match(self, video: VideoInput, texts: str | Sequence[str]) -> torch.Tensor:
        """(N,) probability that each text matches the video, from the cross-modal (fusion) part."""
        self._need("match")
        frames, mask = self.preprocess(video)
        tok = self.tokenize([texts] if isinstance(texts, str) else texts)
        v = self.model.video_features(frames[None], _mask(mask)).select(torch.zeros(len(tok.input_ids), dtype=torch.long))
        t = self.model.text_features(tok.input_ids, tok.attention_mask)
        return self.model.score_pairs(v, t).float().softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def answer(self, video: VideoInput, question: str, top: int = 5) -> Answer:
        """The open-ended answer to `question` about `video`, its probability and the next `top - 1`."""
        self._need("answer")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("the question is empty; ask e.g. \"what colour is the square?\"")
        if top < 1:
            raise ConfigError(f"top={top}: must be >= 1")
        if self.kind == "frame_qa":
            from evl.techniques.vlap.evaluate import ask

            path, start, end = _video_input(video)
            r = ask(self.model, self.vocab, self.tokenizer, path, question, top, start=start, end=end)
            return Answer(r.answer, r.score, [tuple(a) for a in r.alternatives], r.frames)
        frames, mask = self.preprocess(video)
        tok = self.tokenize([question])
        v = self.model.video_features(frames[None], _mask(mask))
        probs = self.model.answer(v, self.model.text_features(tok.input_ids, tok.attention_mask))[0].float().softmax(-1)
        values, ids = probs.topk(min(top, probs.numel()))
        ranked = [(self.vocab.decode(int(i)), round(float(p), 4)) for p, i in zip(values, ids, strict=True)]
        return Answer(ranked[0][0], ranked[0][1], ranked[1:])


# ---------------------------------------------------------------------------------------------- loading


def load(path: str | Path, backend: Backend | None = None, threads: int | None = None) -> EvlModel:
    """Load an evl model folder: a checkpoint (`final/` of `evl pretrain`, `evl finetune`, `evl vlap
    train`) with backend "torch", or an `evl export` folder with backend "onnx" / "onnx-int8" (the
    default for such a folder). `threads`: ONNX Runtime intra-op threads (default: its own choice)."""
    from evl.checkpoint import read_config

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not an evl model folder (no config.json); pass e.g. "
                              "runs/quickstart/retrieval/final or an `evl export` folder")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    exported = (path / EXPORT_FILE).is_file()
    if exported:
        backend = backend or "onnx"
        if backend == "torch":
            source = json.loads((path / EXPORT_FILE).read_text()).get("source", "the checkpoint it was exported from")
            raise ConfigError(f"{path} is an ONNX export: load it with backend='onnx' or 'onnx-int8', or load "
                              f"{source} with backend='torch'")
        return _load_onnx(path, backend, threads)
    backend = backend or "torch"
    kind = read_config(path).get("kind")
    if backend != "torch":
        if kind == "frame_qa":
            raise ConfigError(f"{path} is a frame-QA model, which runs with backend='torch' only (it is not exported)")
        raise ConfigError(f"{path} is a PyTorch checkpoint; backend={backend!r} runs an exported model: "
                          f"`evl export {path} --format onnx --out DIR`, then load DIR with backend {backend!r}")
    if kind == "frame_qa":
        return _load_frame_qa(path)
    return _load_video_language(path)


def _load_video_language(path: Path) -> EvlModel:
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel

    model = VideoLanguageModel.from_pretrained(path).eval()
    vocab = VideoLanguageModel.read_vocab(path)
    kind = "qa" if model.qa_head is not None and vocab is not None else "fusion" if model.has_fusion else "dual"
    cfg = model.cfg
    return EvlModel(path, kind, "torch", cfg.video.num_frames, cfg.video.image_size, tokenizer_for(cfg, path),
                    MAX_TEXT_LEN, cfg.embed_dim, torch_model=model, vocab=vocab)


def _load_frame_qa(path: Path) -> EvlModel:
    from evl.data.text import tokenizer_for
    from evl.techniques.vlap.frame_qa import FrameQAModel

    model = FrameQAModel.from_pretrained(path)
    cfg = model.cfg
    return EvlModel(path, "frame_qa", "torch", cfg.num_candidates, cfg.video.image_size, tokenizer_for(cfg, path),
                    cfg.max_text_len, None, torch_model=model, vocab=FrameQAModel.read_vocab(path))


def _load_onnx(path: Path, backend: str, threads: int | None) -> EvlModel:
    from evl.data.text import Tokenizer

    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("running an exported model needs ONNX Runtime: pip install onnxruntime") from None
    meta = json.loads((path / EXPORT_FILE).read_text())
    files = [path / name for name in ONNX_FILES[backend]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}; re-run `evl export` into it")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # ONNX Runtime's threads busy-wait after each call by default: between calls (decoding the next video,
    # other work) they would take the CPU from everything else (`evl index` was slower than with PyTorch)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = tuple(ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in files)
    return EvlModel(path, "onnx", backend, meta["num_frames"], meta["image_size"], Tokenizer.from_pretrained(path),
                    meta["max_text_len"], meta["embed_dim"], sessions=sessions, fingerprint=meta["source_fingerprint"])


def _mask(mask: torch.Tensor) -> torch.Tensor | None:
    """(1, T) frame mask, or None when every frame is real (attention's fast path, as evaluation does)."""
    return None if bool(mask.all()) else mask[None]


def _is_window(video: Any) -> bool:
    """(file, start, end) with numbers (or None) for the times — not a tuple of files."""
    return (isinstance(video, tuple) and len(video) == 3 and isinstance(video[0], (str, Path))
            and all(t is None or (isinstance(t, numbers.Real) and not isinstance(t, bool)) for t in video[1:]))


def _video_input(video: VideoInput) -> tuple[Path, float | None, float | None]:
    if isinstance(video, tuple):
        if not _is_window(video):
            raise ConfigError(f"a video window is (file, start seconds, end seconds), got {video!r}")
        return Path(video[0]), *(None if t is None else float(t) for t in video[1:])
    if not isinstance(video, (str, Path)):
        raise ConfigError(f"a video is a file path or (file, start, end), got {type(video).__name__}")
    return Path(video), None, None


def _describe(kind: str) -> str:
    return {"dual": "a dual encoder", "fusion": "a dual encoder with a fusion part",
            "qa": "a QA model", "frame_qa": "a frame-QA model (evl vlap train)",
            "onnx": "exported dual encoders"}[kind]


def evaluate_folder(checkpoint: str | Path, task: str, data: str | Path, videos: str | Path | None = None, *,
                    fmt: str | None = None, split: str | None = None, frames: int | None = None,
                    batch_size: int = 32, rerank_k: int = 16, device: str = "auto") -> dict:
    """`evl eval`: a video-language checkpoint's metrics for `task` (retrieval / qa / mc) on an annotation
    file; every bad argument is an error naming it (an ONNX export and a frame-QA folder are told where
    they are evaluated)."""
    from evl.data import MAX_FRAMES
    from evl.errors import EvlError
    from evl.models.saved import describe_kind
    from evl.recipes import evaluate_checkpoint_model
    from evl.tasks.evaluate import EvalSettings
    from evl.tasks.registry import get_task
    from evl.train.dist import pick_device

    spec = get_task(task)
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise EvlError(f"--frames {frames}: must be a positive number of frames, at most {MAX_FRAMES} per clip "
                       "(or leave it out for the model's)")
    if not 0 <= rerank_k <= 100_000:
        raise EvlError(f"--rerank-k {rerank_k}: must be between 0 and 100000 (0 switches fusion re-ranking off)")
    if not 1 <= batch_size <= 100_000:
        raise EvlError(f"--batch-size {batch_size}: must be between 1 and 100000")
    if not (Path(checkpoint) / "config.json").is_file():
        raise EvlError(f"{checkpoint}: not an evl checkpoint folder (no config.json)")
    if not Path(data).is_file():
        raise EvlError(f"--data {data}: no such annotation file")
    pick_device(device, key="--device")
    model = load(checkpoint)
    if model.kind == "onnx":
        raise EvlError(f"{checkpoint} is an ONNX export of the dual encoder: evaluate the checkpoint it was "
                       "exported from (export.json names it), or run the export with evl.load / evl index")
    if model.kind == "frame_qa":
        raise EvlError(f"{checkpoint} holds {describe_kind('frame_qa')}, not a video-language model: "
                       f"evaluate it with `evl vlap eval {checkpoint} --data ANNOTATION`")
    tubelet = model.model.cfg.video.tubelet_size
    if frames is not None and frames % tubelet:
        raise EvlError(f"--frames {frames}: must be a multiple of the model's tubelet size ({tubelet} frames per "
                       f"token), e.g. --frames {max(tubelet, frames - frames % tubelet)}")
    if spec.uses_answer_vocab and model.vocab is None:
        raise EvlError(f"{checkpoint} has no answers.json (nor its run folder): it was not fine-tuned "
                       "for QA (task=qa)")
    settings = EvalSettings(batch_size=batch_size, rerank_k=rerank_k, device=device)
    metrics = evaluate_checkpoint_model(model.model, task, data, videos, model.tokenizer, settings,
                                        vocab=model.vocab if spec.uses_answer_vocab else None, fmt=fmt,
                                        num_frames=frames, split=split)
    return metrics
