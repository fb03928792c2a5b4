"""The tokenizer (byte-level BPE, 8192 tokens, HF ``tokenizers``) and the uint16 token arrays.

Byte-level BPE because it is exact (any text round-trips, no unknown token), it makes Python
sources ~3–4× shorter than bytes (more text per FLOP in a 10-minute run), and the vocabulary matrix
is then as large a share of the model as in real LLaMA-style models. The vocabulary is trained on
the train split only; ``<|endoftext|>`` (id 0) ends every document. ``tokens.npz`` is a cache
rebuilt from the carried ``.txt.xz`` files and ``tokenizer.json`` in seconds; it lies beside the corpus
folder (``lmdata/corpus-tokens.npz``), not in it, so carrying the folder does not carry the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
EOS_ID = 0


def train_tokenizer(texts: list[str], *, vocab_size: int = 8192) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` (deterministic for the same texts and vocab size)."""
    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [257, 65536] (ids are stored as uint16), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(EOS) != EOS_ID:
        raise AssertionError(f"{EOS} must have id {EOS_ID}")
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one uint16 array, each followed by ``EOS_ID``."""
    if tokenizer.get_vocab_size() > 65536:
        raise ValueError("uint16 token arrays need a vocabulary of at most 65536 tokens")
    pieces = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=np.uint16))
        pieces.append(np.array([EOS_ID], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def decode(tokenizer: Tokenizer, ids: np.ndarray | list[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokens(corpus: Path, *, cache: Path | None = None) -> dict[str, np.ndarray]:
    """``{"train": uint16 array, "heldout": ...}`` of a corpus folder, from the cache when it matches.

    The cache (``<corpus>-tokens.npz`` beside the folder unless given) is keyed by the checksums of the split files and
    of the tokenizer, so a rebuilt corpus is tokenised again.
    """
    from benchmarks.llm_lib.corpus import SPLITS, read_split

    corpus = Path(corpus)
    tokenizer_path = corpus / "tokenizer.json"
    missing = [p.name for p in [tokenizer_path, *(corpus / f"{s}.txt.xz" for s in SPLITS)] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{corpus} lacks {missing}: build it with `python -m benchmarks.llm_lib.corpus`")
    key = hashlib.sha256(b"".join(p.read_bytes() for p in
                                  [tokenizer_path, *(corpus / f"{s}.txt.xz" for s in SPLITS)])).hexdigest()
    cache = cache or corpus.with_name(corpus.name + "-tokens.npz")
    if cache.exists():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return {s: saved[s] for s in SPLITS}
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    arrays = {s: encode_documents(tokenizer, read_split(corpus / f"{s}.txt.xz")) for s in SPLITS}
    np.savez(cache, key=np.array(key), **arrays)
    return arrays
