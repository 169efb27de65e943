"""CLIP text tokenizer, built offline from OpenAI's packaged BPE merges file.

Every OpenAI-format CLIP checkpoint expects text tokenized the way OpenAI's ``clip.tokenize`` does
it. transformers' CLIP tokenizer implements the same byte-level BPE, so rather than keep a second
BPE implementation here we derive its ``vocab.json`` / ``merges.txt`` from the merges file that
ships with this package (``dcgh_dist/assets/bpe_simple_vocab_16e6.txt.gz``) and let the Rust
``tokenizers`` backend do the work, which is also what makes batches fast.

The output layout is OpenAI's, not Hugging Face's: ``[<|startoftext|>] + bpe(text) +
[<|endoftext|>]``, zero-padded to ``context_length``; too-long texts are cut so that the last
position still holds ``<|endoftext|>``. The text towers pool at that token, so it must always be
present.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dcgh_dist.storage import publish_dir

logger = logging.getLogger(__name__)

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
# Merge lines OpenAI's SimpleTokenizer keeps: lines[1 : 49152 - 256 - 2 + 1] of the merges file.
_NUM_MERGES = 49152 - 256 - 2
# Bump when the files written to the cache change, so stale caches are never reused.
_CACHE_FORMAT = "1"

_BPE_ASSET = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# "a photo of a cat" without the start/end tokens: a cheap end-to-end check of a built vocabulary.
_PROBE_TEXT = "a photo of a cat"
_PROBE_IDS = [320, 1125, 539, 320, 2368]

_WHITESPACE = re.compile(r"\s+")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def default_bpe_path() -> Path:
    """The BPE merges file shipped as package data."""
    return _BPE_ASSET


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-unicode-character table, in byte-value order.

    Printable latin-1 bytes map to themselves; the remaining bytes are shifted to code points from
    256 up, so that every byte has a visible, non-whitespace stand-in that BPE can merge.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    # The vocabulary order OpenAI uses is this table's insertion order (printable bytes first).
    ordered = printable + [b for b in range(256) if b not in printable]
    return [chars[b] for b in ordered]


def build_clip_vocab(bpe_path: str | os.PathLike[str]) -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's token -> id table and merge list from a ``bpe_simple_vocab_16e6.txt.gz`` file.

    Vocabulary order: the 256 byte characters, the same with ``</w>``, one token per merge, then
    the start and end tokens (49,408 entries for the OpenAI file).
    """
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the CLIP BPE merges file {bpe_path}: {e}") from e
    merge_lines = lines[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{bpe_path} is not CLIP's BPE merges file: expected {_NUM_MERGES} merge pairs after "
            "the header line (the file ships as dcgh_dist/assets/bpe_simple_vocab_16e6.txt.gz)"
        )
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_path} yields duplicate vocabulary entries; is the file corrupt?")
    return vocab, [f"{a} {b}" for a, b in merges]


def _encode_plain(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """BPE ids of already-cleaned texts, without special tokens, truncation or padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust backend encodes the whole batch in one call (and in parallel).
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    # Slow (pure Python) tokenizer: correct, just slower.
    return tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]


def _probe_ok(tokenizer: Any) -> bool:
    """Whether a tokenizer maps the probe text to the known CLIP ids (and has CLIP's size)."""
    try:
        ids = _encode_plain(tokenizer, [_PROBE_TEXT])[0]
        return list(ids) == _PROBE_IDS and len(tokenizer) == CLIP_VOCAB_SIZE
    except Exception:  # noqa: BLE001 - any failure just means "not usable, rebuild"
        return False


def _load_hf_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """A transformers CLIP tokenizer from local files (fast backend preferred)."""
    import transformers

    try:
        return transformers.CLIPTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as fast_error:  # noqa: BLE001 - fall back to the slow class, then report both
        # transformers < 5 builds the fast tokenizer by converting the slow one; should that fail,
        # the slow tokenizer alone still works. transformers >= 5 aliases both names.
        logger.debug("CLIPTokenizerFast failed for %s: %s", directory, fast_error)
        try:
            return transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as slow_error:  # noqa: BLE001
            raise ValueError(
                f"cannot load a CLIP tokenizer from {directory}: {fast_error}; {slow_error}"
            ) from slow_error


def _write_tokenizer_dir(target: Path, bpe_path: Path) -> None:
    """Write vocab.json / merges.txt (and a tokenizer.json for fast reloads) into ``target``."""
    vocab, merges = build_clip_vocab(bpe_path)
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    (target / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "pad_token": EOT_TOKEN,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tok = _load_hf_tokenizer(target)
    if not _probe_ok(tok):
        raise RuntimeError(
            "the CLIP tokenizer built from the packaged BPE file does not reproduce the known ids "
            f"for {_PROBE_TEXT!r}; the installed transformers/tokenizers may be incompatible"
        )
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and not (target / "tokenizer.json").exists():
        # A serialized fast tokenizer loads without the slow->fast conversion older
        # transformers releases perform on every load from vocab/merges files.
        backend.save(str(target / "tokenizer.json"))


def _cached_tokenizer_dir(bpe_path: Path, cache_root: Path) -> Path:
    """Build (once) and return the tokenizer directory for ``bpe_path`` under ``cache_root``.

    The directory name carries a hash of the BPE file, so a different file never reuses a stale
    cache. It is published whole (``storage.publish_dir``), so concurrent processes either see a
    complete directory or none at all, and the first to finish wins.
    """
    digest = hashlib.sha256(bpe_path.read_bytes() + _CACHE_FORMAT.encode()).hexdigest()[:16]
    final = cache_root / f"dcgh_dist_clip_bpe_{digest}"
    if (final / "tokenizer.json").is_file() or (final / "vocab.json").is_file():
        return final
    # No marker: a directory in the way counts as published even if damaged (a temp cleaner may
    # have removed files); the caller's probe finds that and rebuilds privately.
    publish_dir(str(final), lambda staging: _write_tokenizer_dir(Path(staging), bpe_path))
    logger.debug("CLIP tokenizer files cached in %s", final)
    return final


def _has_tokenizer_files(directory: Path) -> bool:
    if (directory / "tokenizer.json").is_file():
        return True
    return (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()


class ClipTokenizer:
    """OpenAI ``clip.tokenize(texts, context_length, truncate=True)`` on a transformers backend.

    Args:
        context_length: length of every output row (OpenAI CLIP uses 77; DCGH uses 32).
        tokenizer_dir: a local Hugging Face CLIP directory; its own tokenizer files are used when
            it has any, otherwise the tokenizer is built from the packaged BPE file.
        cache_dir: where the files derived from the packaged BPE file are cached (default: the
            system temporary directory).

    Calling the tokenizer on a sequence of N strings returns an int64 array of shape
    (N, context_length). Pickling sends only the configuration; the backend is rebuilt lazily in
    the receiving process (e.g. a Ray Data worker).
    """

    def __init__(
        self,
        context_length: int = 32,
        tokenizer_dir: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if int(context_length) < 2:
            raise ValueError(
                f"context_length must be at least 2 (start and end tokens), got {context_length}"
            )
        self.context_length = int(context_length)
        self.tokenizer_dir = None if tokenizer_dir is None else str(tokenizer_dir)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        # OpenAI runs ftfy.fix_text first (mojibake repair, quote straightening, NFC). Use it when
        # installed; the choice travels with pickles so every worker tokenizes alike.
        self.use_ftfy = importlib.util.find_spec("ftfy") is not None
        self._tok: Any = None
        self._build()  # eager in the creating process: configuration errors surface here

    # -- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        tok = None
        if self.tokenizer_dir is not None:
            directory = Path(self.tokenizer_dir)
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"tokenizer_dir {self.tokenizer_dir!r} is not a directory; pass a local "
                    "Hugging Face CLIP directory or None to use the packaged vocabulary"
                )
            if _has_tokenizer_files(directory):
                tok = _load_hf_tokenizer(directory)
            else:
                logger.info(
                    "%s has no tokenizer files; using the packaged CLIP BPE vocabulary",
                    directory,
                )
        if tok is None:
            tok = self._packaged_tokenizer()

        sot = tok.convert_tokens_to_ids(SOT_TOKEN)
        eot = tok.convert_tokens_to_ids(EOT_TOKEN)
        if sot is None or eot is None or sot == eot:  # a missing token maps to unk
            raise ValueError(
                f"the tokenizer in {self.tokenizer_dir} has no {SOT_TOKEN} / {EOT_TOKEN} tokens; "
                "it is not a CLIP tokenizer"
            )
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            # Special tokens, truncation and padding are applied here in OpenAI's layout; a
            # tokenizer.json that enables them must not interfere.
            backend.no_truncation()
            backend.no_padding()
        else:
            logger.warning("using a slow (pure Python) CLIP tokenizer; batches will be slower")
        self._tok = tok
        self.sot_id = int(sot)
        self.eot_id = int(eot)
        self.vocab_size = int(len(tok))

    def _packaged_tokenizer(self) -> Any:
        bpe_path = default_bpe_path()
        if not bpe_path.is_file():
            raise FileNotFoundError(
                f"the packaged CLIP BPE file is missing ({bpe_path}); reinstall dcgh-dist"
            )
        root = Path(self.cache_dir) if self.cache_dir else Path(tempfile.gettempdir())
        directory = _cached_tokenizer_dir(bpe_path, root)
        try:
            tok = _load_hf_tokenizer(directory)
        except ValueError:
            tok = None  # e.g. a directory emptied by a temp-file cleaner: handled below
        if tok is None or not _probe_ok(tok):
            # A damaged or foreign cache (shared temp dirs are writable by others): rebuild into a
            # private directory rather than tokenizing with the wrong vocabulary.
            # The loaded tokenizer lives in memory, so the private files can go right away.
            logger.warning(
                "cached CLIP tokenizer in %s is invalid; rebuilding it privately "
                "(delete that directory to have it recreated)",
                directory,
            )
            with tempfile.TemporaryDirectory(prefix=".dcgh_dist_clip_bpe_", dir=root) as private:
                _write_tokenizer_dir(Path(private), bpe_path)
                tok = _load_hf_tokenizer(private)
        return tok

    # -- pickling: ship the configuration, not the backend ------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length,
            "tokenizer_dir": self.tokenizer_dir,
            "cache_dir": self.cache_dir,
            "use_ftfy": self.use_ftfy,
            "vocab_size": self.vocab_size,
            "sot_id": self.sot_id,
            "eot_id": self.eot_id,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.context_length = state["context_length"]
        self.tokenizer_dir = state["tokenizer_dir"]
        self.cache_dir = state["cache_dir"]
        self.use_ftfy = state["use_ftfy"]
        self.vocab_size = state["vocab_size"]
        self.sot_id = state["sot_id"]
        self.eot_id = state["eot_id"]
        self._tok = None  # rebuilt on first call in this process

    def __repr__(self) -> str:
        source = self.tokenizer_dir or "packaged BPE"
        return f"ClipTokenizer(context_length={self.context_length}, source={source!r})"

    # -- tokenization -------------------------------------------------------------------------

    def clean(self, text: str) -> str:
        """OpenAI's cleaning: ftfy (if installed), HTML unescape, whitespace collapse, lower."""
        if self.use_ftfy:
            import ftfy

            text = ftfy.fix_text(text)
        # Twice, as OpenAI does: captions scraped from HTML are sometimes double-escaped.
        text = html.unescape(html.unescape(text)).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """Token ids, int64 of shape (len(texts), context_length); a lone string is one row."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if self._tok is None:
            if self.use_ftfy and importlib.util.find_spec("ftfy") is None:
                raise ImportError(
                    "this tokenizer was created where ftfy is installed and applies ftfy.fix_text; "
                    "install ftfy in this worker environment too, so all workers tokenize alike"
                )
            self._build()

        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        if not texts:
            return out
        encoded = _encode_plain(self._tok, [self.clean(t) for t in texts])
        room = self.context_length - 2  # positions left between the start and end tokens
        for row, full in zip(out, encoded):
            ids = full[:room]
            n = len(ids)
            row[0] = self.sot_id
            row[1 : n + 1] = ids
            row[n + 1] = self.eot_id
        return out


__all__ = ["CLIP_VOCAB_SIZE", "ClipTokenizer", "build_clip_vocab", "default_bpe_path"]
