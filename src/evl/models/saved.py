"""One way every model kind is saved and loaded: `SavedModel`.

A saved model is a folder: its weights (`model.safetensors`, or the kind's own file name), `config.json`
and, for a model that answers questions, the answer vocabulary (`answers.json`). `config.json` holds
`{"kind": ..., <config_key>: the typed config, "metadata": {...}}`; the video-language model — the first
kind evl had — records no kind. `from_pretrained` checks the kind (another kind is an error that says
what the folder holds and where to get the right one), rebuilds the model from its typed config and
loads the weights strictly. The video-language model, the frame-QA model (VLAP) and the VQ tokenizer
(E-ViLM) all inherit it, each saying only what differs: its kind, config class and config key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from evl.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_PREFIX,
    atomic_write_json,
    atomic_write_safetensors,
    load_model_state,
    read_config,
)
from evl.config import from_dict, to_dict
from evl.data.answers import ANSWERS_FILE, AnswerVocab, read_answer_vocab
from evl.errors import CheckpointError

# what a folder of each kind holds, for the error when a folder of another kind is passed
KINDS: dict[str | None, str] = {
    None: "a video-language model (from `evl pretrain` / `evl finetune`; for `evl eval`, `evl index`, `--init`)",
    "frame_qa": "a frame-QA model (kind 'frame_qa', from `evl vlap train`; for `evl ask`, `evl vlap eval` and "
                "`evl serve --ask-model`)",
    "frame_qa_training": "a Trainer checkpoint of `evl vlap train` (kind 'frame_qa_training'; pass its out_dir/final "
                         "instead)",
    "vq_tokenizer": "a VQ tokenizer (kind 'vq_tokenizer', from `evl vq train`; for the mvm loss term)",
    "vq_tokenizer_training": "a Trainer checkpoint of `evl vq train` (kind 'vq_tokenizer_training'; pass its "
                             "out_dir/final instead)",
}


def describe_kind(kind: str | None) -> str:
    return KINDS.get(kind, f"a {kind!r} checkpoint")


class SavedModel:
    """Mixin for an `nn.Module` with a typed config in `self.cfg`."""

    kind: ClassVar[str | None] = None            # recorded in config.json
    config_key: ClassVar[str] = "model"          # where config.json keeps the typed config
    config_class: ClassVar[type]                 # the typed config (a dataclass)
    weights_file: ClassVar[str] = MODEL_FILE
    what: ClassVar[str] = "a video-language model"
    how_to_get: ClassVar[str] = "pass the final/ of `evl pretrain` or `evl finetune` (e.g. runs/pretrain-tiny/final)"

    cfg: Any

    def config_dict(self) -> dict:
        return to_dict(self.cfg)

    @classmethod
    def from_config_dict(cls, data: dict, where: str = "model"):
        return cls(from_dict(cls.config_class, data, where=where))

    def save_pretrained(self, directory: str | Path, vocab: AnswerVocab | None = None,
                        metadata: dict | None = None) -> Path:
        """Weights, config.json and (given) the answer vocabulary into `directory`; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"kind": self.kind} if self.kind else {}
        config[self.config_key] = self.config_dict()
        if self.kind or metadata is not None:
            config["metadata"] = metadata or {}
        atomic_write_safetensors(directory / self.weights_file, self.state_dict())
        atomic_write_json(directory / CONFIG_FILE, config)
        if vocab is not None:
            (directory / ANSWERS_FILE).write_text(vocab.to_json())
        return directory

    @classmethod
    def checkpoint_config(cls, directory: str | Path) -> dict:
        """`config.json` of a folder holding this kind of model; any other folder is an error that says
        what it holds and what to pass instead."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise CheckpointError(f"{directory / CONFIG_FILE} does not exist: {directory} is not {cls.what} folder "
                                  f"(no {CONFIG_FILE}); {cls.how_to_get}")
        config = read_config(directory)
        if config.get("kind") != cls.kind:
            raise CheckpointError(f"{directory} holds {describe_kind(config.get('kind'))}, not {cls.what}; "
                                  f"{cls.how_to_get}")
        if cls.config_key not in config:
            raise CheckpointError(f"{directory}/{CONFIG_FILE} has no {cls.config_key!r} section; was it saved by evl?")
        return config

    @classmethod
    def load_weights(cls, model, directory: str | Path, strict: bool = True):
        """The folder's weights into `model` (a Trainer checkpoint keeps them under "model.")."""
        load_model_state(model, Path(directory) / cls.weights_file, strict=strict, strip_prefix=MODEL_PREFIX)
        return model

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        config = cls.checkpoint_config(directory)
        model = cls.from_config_dict(config[cls.config_key], where=f"{directory}/{CONFIG_FILE} {cls.config_key}")
        return cls.load_weights(model, directory)

    @staticmethod
    def read_vocab(directory: str | Path) -> AnswerVocab | None:
        """The answer vocabulary saved with the model (or its run folder's), or None."""
        return read_answer_vocab(directory)
