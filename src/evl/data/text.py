"""Text tokenization (the checkpoint's own tokenizer.json) and BERT-style MLM masking.

The tokenizer is the HF `tokenizers` object stored beside the text weights, so evl's ids are exactly the
ids the weights were trained with (and equal to what sentence-transformers / transformers produce).
Padding and truncation are done here rather than by the tokenizer's stored settings, because the stored
settings (MiniLM's pads everything to 128) are a property of the file, and a stateless call is safe to
share across DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evl.checkpoint import minilm_path, resolve_pretrained
from evl.errors import CheckpointError, ConfigError, EvlError


class TextInputError(EvlError, ValueError):
    """Texts given to the tokenizer (or masking) are not usable: empty batch, non-string, bad length."""


@dataclass
class TokenBatch:
    """`input_ids` (B,L) int64, `attention_mask` (B,L) int64 with 1 = real token; L = longest in batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


@dataclass
class MaskedTokens:
    """MLM inputs: `input_ids` with chosen positions corrupted; `labels` = original id there, -100 elsewhere."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def _special_token_id(tok, token: str, folder: Path) -> int:
    idx = tok.token_to_id(token)
    if idx is None:
        raise CheckpointError(f"{folder / 'tokenizer.json'} has no {token} token; evl needs a BERT-style vocabulary")
    return idx


class Tokenizer:
    """BERT WordPiece tokenizer from a checkpoint folder's tokenizer.json (`from_pretrained("minilm")`)."""

    def __init__(self, tokenizer, source: Path):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.source = source
        self.pad_id = _special_token_id(tokenizer, "[PAD]", source)
        self.cls_id = _special_token_id(tokenizer, "[CLS]", source)
        self.sep_id = _special_token_id(tokenizer, "[SEP]", source)
        self.mask_id = _special_token_id(tokenizer, "[MASK]", source)
        specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids: frozenset[int] = frozenset(specials | {self.pad_id, self.cls_id, self.sep_id, self.mask_id})

    @classmethod
    def from_pretrained(cls, folder_or_name: str | Path = "minilm") -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        folder = resolve_pretrained(folder_or_name)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json (save the HF fast tokenizer there)")
        try:
            return cls(HFTokenizer.from_file(str(path)), folder)
        except Exception as e:  # the Rust library raises plain Exception on malformed files
            raise CheckpointError(f"cannot read {path}: {e}") from e

    @property
    def fingerprint(self) -> str:
        """sha1 of the tokenizer's full definition (vocabulary, normaliser, specials): equal for a copy
        read from any folder."""
        import hashlib

        return hashlib.sha1(self._tok.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Sequence[str], max_length: int = 32) -> TokenBatch:
        """Tokenize a batch: [CLS] ... [SEP], truncated to `max_length` (keeping the final [SEP]),
        padded with [PAD] to the longest sequence in the batch."""
        _check_texts(texts, max_length)
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        rows = [self._truncate(e.ids, max_length) for e in encodings]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return TokenBatch(ids, mask)

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        """Same result as HF truncation of a single sequence: drop word pieces from the end, keep [SEP]."""
        if len(ids) <= max_length:
            return ids
        return ids[: max_length - 1] + [ids[-1]]

    def encode_words(self, words: Sequence[str]) -> list[int]:
        """Token ids of `words` (no [CLS]/[SEP])."""
        return list(self._tok.encode(" ".join(words), add_special_tokens=False).ids)

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = True) -> str | list[str]:
        """One sequence → str; a (B,L) tensor or list of lists → list of str."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return self._tok.decode_batch([list(r) for r in ids], skip_special_tokens=skip_special_tokens)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _check_texts(texts: Sequence[str], max_length: int) -> None:
    if isinstance(texts, str):
        raise TextInputError("the tokenizer takes a list of texts; wrap a single text in a list: tokenizer([text])")
    if not isinstance(texts, Sequence) or len(texts) == 0:
        raise TextInputError(f"the tokenizer needs a non-empty list of texts, got {texts!r}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        i = bad[0]
        raise TextInputError(
            f"text #{i} is {type(texts[i]).__name__} ({texts[i]!r}), not a string ({len(bad)} non-string item(s) in the batch)"
        )
    if not isinstance(max_length, int) or max_length < 2:
        raise TextInputError(f"max_length must be an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, prob: float = 0.15,
                generator: torch.Generator | None = None, unmaskable: frozenset[int] = frozenset()) -> MaskedTokens:
    """BERT masking: choose `prob` of the real, non-special tokens; of those 80% → [MASK], 10% → a random
    non-special token, 10% unchanged. `labels` hold the original id at chosen positions, -100 elsewhere.

    Every sequence with at least one maskable token gets at least one chosen position (drawn uniformly
    among its maskable tokens when the coin flips chose none), so a batch of short captions never has
    zero MLM targets and the mean cross-entropy is never 0/0 = NaN. A batch with no maskable token at all
    still gives all -100 labels; callers should skip the loss then.

    `tokenizer` is anything with `mask_id`, `special_ids` and `vocab_size` (e.g. `Tokenizer`).
    `unmaskable`: token ids never chosen besides the special tokens (e.g. `function_word_ids`).
    Randomness comes only from `generator` (CPU), so masking is reproducible.
    """
    if not 0.0 < prob < 1.0:
        raise TextInputError(f"MLM masking probability must be in (0, 1), got {prob}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise TextInputError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, L)"
        )
    device = input_ids.device
    ids = input_ids.cpu()
    special = torch.tensor(sorted(set(tokenizer.special_ids) | set(unmaskable)), dtype=ids.dtype)
    maskable = attention_mask.cpu().bool() & ~torch.isin(ids, special)

    chosen = _choose_positions(maskable, prob, generator)
    action = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)

    out = ids.clone()
    out[to_mask] = tokenizer.mask_id
    out[to_random] = _random_regular_ids(int(to_random.sum()), tokenizer, ids.dtype, generator)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return MaskedTokens(input_ids=out.to(device), labels=labels.to(device))


FUNCTION_WORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every no all both
and or but nor so then than as if while when where after afterwards before until once meanwhile also
of in on at to from by with into onto over under up down out off about above below through across
is are was were be been being am has have had do does did can could will would shall should may might
it its it's he she they them their his her we us our you your i me my who whom which what
there here not just very too again still
""".split())
"""English words that a caption's own text predicts well (articles, conjunctions, prepositions,
pronouns, auxiliaries): MLM with `skip_function_words` never masks them, so its targets are the words
that need the video. Measured (EgoVLPv2 recipe, SynthVL, 150 steps): with plain BERT masking the fused
model predicted 78% of the other masked words from the text alone and colour words at 18.6% with the
clip's own video against 15.9% with another clip's — MLM was not teaching the fusion to look."""


def function_word_ids(tokenizer) -> frozenset[int]:
    """Token ids of the `FUNCTION_WORDS` that the tokenizer keeps as one token (lower-cased BERT
    WordPiece: all of them)."""
    ids = set()
    for word in FUNCTION_WORDS:
        pieces = tokenizer.encode_words([word])
        if len(pieces) == 1:
            ids.add(pieces[0])
    return frozenset(ids)


def _choose_positions(maskable: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(prob) over maskable positions, plus one forced position in rows that got none."""
    chosen = (torch.rand(maskable.shape, generator=generator) < prob) & maskable
    empty = maskable.any(1) & ~chosen.any(1)
    if empty.any():
        scores = torch.rand(maskable.shape, generator=generator).masked_fill(~maskable, -1.0)
        forced = torch.zeros_like(chosen)
        forced[torch.arange(len(scores)), scores.argmax(1)] = True
        chosen |= forced & empty[:, None]
    return chosen


def _random_regular_ids(n: int, tokenizer, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """`n` ids drawn uniformly from the vocabulary minus the special tokens."""
    regular = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    regular[sorted(tokenizer.special_ids)] = False
    pool = regular.nonzero().squeeze(1)
    return pool[torch.randint(len(pool), (n,), generator=generator)].to(dtype)


def tokenizer_source(text_cfg) -> str:
    """Where a text tower's tokenizer comes from: `text.tokenizer`, else the `text.pretrained`
    weights' folder, else the packaged MiniLM vocabulary (a randomly initialised BERT-uncased tower)."""
    return str(text_cfg.tokenizer or text_cfg.pretrained or "minilm")


def tokenizer_for(model_cfg, checkpoint: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a model: the tokenizer.json saved in `checkpoint` when there is one, else
    `tokenizer_source(model_cfg.text)`. Its vocabulary must fit the model's embedding table."""
    folder = Path(checkpoint) if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file() else None
    tok = Tokenizer.from_pretrained(folder if folder is not None else tokenizer_source(model_cfg.text))
    if tok.vocab_size > model_cfg.text.vocab_size:
        raise ConfigError(f"the tokenizer from {tok.source} has {tok.vocab_size} tokens, more than the model's "
                       f"text.vocab_size={model_cfg.text.vocab_size}; set model.text.vocab_size={tok.vocab_size} "
                       "or text.tokenizer to the vocabulary the text weights were trained with")
    return tok


def tokenizer_name(tokenizer: Tokenizer) -> str:
    """How a checkpoint's config records a tokenizer: "minilm" for the packaged one (portable across
    machines), else the absolute folder it was read from."""

    return "minilm" if tokenizer.source.resolve() == minilm_path().resolve() else str(tokenizer.source.resolve())
