"""ClipTokenizer: OpenAI clip.tokenize semantics on the packaged BPE vocabulary, offline."""

from __future__ import annotations

import gzip
import html
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dcgh_dist.data import tokenizer as tokmod  # noqa: E402
from dcgh_dist.data.tokenizer import (  # noqa: E402
    CLIP_VOCAB_SIZE,
    ClipTokenizer,
    build_clip_vocab,
    default_bpe_path,
)

SOT, EOT = 49406, 49407

TEXTS = [
    "a photo of a cat",
    "Hello, World!!",
    "A DOG's bone; isn't it?? ...",
    "café naïve résumé",
    "日本語のテキスト",
    "emoji 😀🎉 test",
    "tabs\tand\nnewlines   here",
    "&amp; &lt;tag&gt; &amp;amp;",
    "numbers 12345 and 3.14",
    "  leading and trailing  ",
    "hyphen-ated words—dash",
    "don't can't we'll they've I'm you'd",
    "ÀÉÎÕÜ UPPERCASE Accents",
    "<|endoftext|> inside text",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> ClipTokenizer:
    return ClipTokenizer(context_length=32, cache_dir=str(tmp_path_factory.mktemp("bpe_cache")))


class _ReferenceClipTokenizer:
    """An independent, pure-Python rendition of OpenAI's SimpleTokenizer + clip.tokenize.

    Written from the algorithm (byte-level pre-tokens, greedy lowest-rank merges with a ``</w>``
    end-of-word marker) so that the transformers backend is checked against something that does
    not share its code. ftfy is not applied: the test texts are already NFC and mojibake-free.
    """

    def __init__(self) -> None:
        import regex  # a requirement of transformers: never missing, so never a skip

        vocab, merges = build_clip_vocab(default_bpe_path())
        self.encoder = vocab
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        printable = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        self.byte_char: dict[int, str] = {}
        extra = 0
        for b in range(256):
            if b in printable:
                self.byte_char[b] = chr(b)
            else:
                self.byte_char[b] = chr(256 + extra)
                extra += 1
        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
            r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def _bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            if piece not in ("<|startoftext|>", "<|endoftext|>"):
                piece = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(piece))
        return ids

    def tokenize(self, texts: list[str], context_length: int) -> np.ndarray:
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in zip(out, texts):
            tokens = [SOT] + self.encode(text) + [EOT]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = EOT
            row[: len(tokens)] = tokens
        return out


def test_known_ids(tok: ClipTokenizer) -> None:
    ids = tok(["a photo of a cat"])
    assert ids.dtype == np.int64 and ids.shape == (1, 32)
    assert ids[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT, 0]
    assert not ids[0, 7:].any()


def test_vocab_size(tok: ClipTokenizer) -> None:
    assert tok.vocab_size == CLIP_VOCAB_SIZE == 49408
    vocab, merges = build_clip_vocab(default_bpe_path())
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == SOT and vocab["<|endoftext|>"] == EOT


def test_empty_string(tok: ClipTokenizer) -> None:
    ids = tok([""])
    assert ids[0, :2].tolist() == [SOT, EOT] and not ids[0, 2:].any()
    assert tok([]).shape == (0, 32)


def test_matches_independent_reference(tok: ClipTokenizer) -> None:
    ref = _ReferenceClipTokenizer()
    np.testing.assert_array_equal(tok(TEXTS), ref.tokenize(TEXTS, 32))


def test_case_whitespace_and_html_are_normalised(tok: ClipTokenizer) -> None:
    a = tok(["A Photo   OF a\tCAT"])
    np.testing.assert_array_equal(a, tok(["a photo of a cat"]))
    np.testing.assert_array_equal(tok(["fish &amp; chips"]), tok(["fish & chips"]))


def test_long_text_is_truncated_with_eot_last(tok: ClipTokenizer) -> None:
    long = "a very long caption about a dog running on the beach " * 20
    ids = tok([long, "short"])
    assert ids.shape == (2, 32)
    assert ids[0, 0] == SOT and ids[0, -1] == EOT
    assert (ids[0] == EOT).sum() == 1 and (ids[0] != 0).all()
    ref = _ReferenceClipTokenizer()
    np.testing.assert_array_equal(ids, ref.tokenize([long, "short"], 32))
    # Exactly context_length tokens with the end token: no truncation needed, nothing lost.
    exact = " ".join(["cat"] * 30)  # 30 content tokens + start + end = 32
    row = tok([exact])[0]
    assert row.tolist() == [SOT] + [2368] * 30 + [EOT]


def test_single_string_and_type_errors(tok: ClipTokenizer) -> None:
    np.testing.assert_array_equal(tok("a photo of a cat"), tok(["a photo of a cat"]))
    np.testing.assert_array_equal(
        tok(np.array(["a photo of a cat", "x"])), tok(["a photo of a cat", "x"])
    )
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(context_length=1)


def test_other_context_length(tok: ClipTokenizer) -> None:
    short = ClipTokenizer(context_length=4, cache_dir=tok.cache_dir)
    assert short("a photo of a cat").tolist() == [[SOT, 320, 1125, EOT]]
    wide = ClipTokenizer(context_length=77, cache_dir=tok.cache_dir)
    assert wide(TEXTS).shape == (len(TEXTS), 77)
    # Every test text fits in 32 positions: the wider rows are the same, zero-extended.
    np.testing.assert_array_equal(wide(TEXTS)[:, :32], tok(TEXTS))
    assert not wide(TEXTS)[:, 32:].any()


def test_pickle_round_trip_ships_config_only(tok: ClipTokenizer) -> None:
    blob = pickle.dumps(tok)
    assert len(blob) < 2000  # the configuration, not a 49k-entry vocabulary
    clone = pickle.loads(blob)
    assert clone.vocab_size == 49408 and clone.context_length == 32
    np.testing.assert_array_equal(clone(TEXTS), tok(TEXTS))
    # A clone of a clone (e.g. re-shipped by a worker) still works.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clone))(TEXTS), tok(TEXTS))


class _Counter:
    """Wraps a function of the tokenizer module and records the arguments of every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls: list[tuple] = []
        self._real = getattr(tokmod, name)
        monkeypatch.setattr(tokmod, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self._real(*args, **kwargs)


def _cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_cache_directory_is_reused(tmp_path, monkeypatch) -> None:
    # Count what a cache miss costs: deriving the vocabulary from the merges file and writing the
    # tokenizer files. A hit does neither and leaves the cached files untouched.
    writes = _Counter(monkeypatch, "_write_tokenizer_dir")
    derivations = _Counter(monkeypatch, "build_clip_vocab")
    loads = _Counter(monkeypatch, "_load_hf_tokenizer")

    first = ClipTokenizer(context_length=8, cache_dir=str(tmp_path))
    assert len(writes.calls) == 1 and len(derivations.calls) == 1
    (built,) = [p for p in tmp_path.iterdir() if p.name.startswith("dcgh_dist_clip_bpe_")]
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in built.iterdir()}
    # No staging directories are left behind.
    assert _cache_entries(tmp_path) == [built.name]
    stamps = _stamps(built)

    loads.calls.clear()
    second = ClipTokenizer(context_length=8, cache_dir=str(tmp_path))
    # The context length is applied after BPE, so it is not part of the cache key.
    wider = ClipTokenizer(context_length=16, cache_dir=str(tmp_path))
    assert len(writes.calls) == 1 and len(derivations.calls) == 1  # nothing rebuilt
    assert [Path(c[0]) for c in loads.calls] == [built, built]  # both loaded from the cache entry
    assert _cache_entries(tmp_path) == [built.name] and _stamps(built) == stamps
    np.testing.assert_array_equal(first(TEXTS), second(TEXTS))
    np.testing.assert_array_equal(wider(TEXTS), _ReferenceClipTokenizer().tokenize(TEXTS, 16))


def test_cache_is_keyed_on_the_bpe_file_and_cache_format(tmp_path, monkeypatch) -> None:
    writes = _Counter(monkeypatch, "_write_tokenizer_dir")
    root = tmp_path / "cache"
    reference = ClipTokenizer(context_length=8, cache_dir=str(root))(TEXTS)
    (original,) = _cache_entries(root)

    # The same bytes under another path: the key is the file's content, so the entry is shared.
    same = tmp_path / "same" / default_bpe_path().name
    same.parent.mkdir()
    same.write_bytes(default_bpe_path().read_bytes())
    monkeypatch.setattr(tokmod, "default_bpe_path", lambda: same)
    ClipTokenizer(context_length=8, cache_dir=str(root))
    assert len(writes.calls) == 1 and _cache_entries(root) == [original]

    # Another file of the same name (its ignored header line differs, so the vocabulary is the
    # same and the tokenizer still works): a new entry, never the stale one.
    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
        text = f.read()
    other = tmp_path / "other" / same.name
    other.parent.mkdir()
    with gzip.open(other, "wt", encoding="utf-8") as f:
        f.write(text.replace("#version: 0.2", "#version: 0.2 (edited)", 1))
    monkeypatch.setattr(tokmod, "default_bpe_path", lambda: other)
    edited_tok = ClipTokenizer(context_length=8, cache_dir=str(root))
    np.testing.assert_array_equal(edited_tok(TEXTS), reference)
    assert len(writes.calls) == 2
    entries = _cache_entries(root)
    assert len(entries) == 2 and original in entries

    # Bumping the cache format invalidates every entry.
    monkeypatch.setattr(tokmod, "default_bpe_path", default_bpe_path)
    monkeypatch.setattr(tokmod, "_CACHE_FORMAT", tokmod._CACHE_FORMAT + "-bumped")
    ClipTokenizer(context_length=8, cache_dir=str(root))
    assert len(writes.calls) == 3 and len(_cache_entries(root)) == 3

    # Back to the original file and format: its entry is hit again, nothing is written.
    monkeypatch.undo()
    writes = _Counter(monkeypatch, "_write_tokenizer_dir")
    ClipTokenizer(context_length=8, cache_dir=str(root))
    ClipTokenizer(context_length=8, cache_dir=str(root))
    assert writes.calls == [] and len(_cache_entries(root)) == 3
    # A different cache_dir is a cache of its own.
    ClipTokenizer(context_length=8, cache_dir=str(tmp_path / "elsewhere"))
    assert len(writes.calls) == 1 and len(_cache_entries(tmp_path / "elsewhere")) == 1


def test_backend_is_built_once_per_process(tok: ClipTokenizer, monkeypatch) -> None:
    # A pickled tokenizer rebuilds its backend on the first call in the receiving process, and
    # only then: later calls reuse the same backend object.
    loads = _Counter(monkeypatch, "_load_hf_tokenizer")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._tok is None and loads.calls == []
    clone(TEXTS)
    backend = clone._tok
    assert backend is not None and len(loads.calls) == 1
    for _ in range(3):
        np.testing.assert_array_equal(clone(TEXTS), tok(TEXTS))
    assert clone._tok is backend and len(loads.calls) == 1
    # The creating process built its backend eagerly and keeps it.
    backend = tok._tok
    tok(TEXTS)
    assert tok._tok is backend and len(loads.calls) == 1


def test_corrupt_cache_is_rebuilt(tmp_path) -> None:
    ClipTokenizer(context_length=8, cache_dir=str(tmp_path))
    (built,) = list(tmp_path.iterdir())
    # Replace the cached files by a foreign vocabulary: the probe check must catch it.
    for f in built.iterdir():
        f.unlink()
    (built / "vocab.json").write_text('{"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}')
    (built / "merges.txt").write_text("#version: 0.2\n")
    tok = ClipTokenizer(context_length=8, cache_dir=str(tmp_path))
    assert tok("a photo of a cat")[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert tok.vocab_size == 49408
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # private rebuild cleaned up
    # An emptied cache directory (temp cleaners do that) is handled the same way.
    for f in built.iterdir():
        f.unlink()
    tok = ClipTokenizer(context_length=8, cache_dir=str(tmp_path))
    assert tok("a photo of a cat")[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    # And a partly cleaned one, whose leftover files block the rename of a fresh build.
    for name in ("vocab.json", "tokenizer.json"):
        (built / name).unlink(missing_ok=True)
    assert any(built.iterdir())
    tok = ClipTokenizer(context_length=8, cache_dir=str(tmp_path))
    assert tok("a photo of a cat")[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]


def test_tokenizer_dir_with_hf_files_is_used(tok: ClipTokenizer, tmp_path) -> None:
    hf = tok._tok  # the transformers tokenizer behind the packaged vocabulary
    hf.save_pretrained(str(tmp_path / "same"))
    from_dir = ClipTokenizer(context_length=32, tokenizer_dir=str(tmp_path / "same"))
    np.testing.assert_array_equal(from_dir(TEXTS), tok(TEXTS))

    # A directory whose tokenizer differs (one added token) proves its files are what is used.
    import copy

    modified = copy.deepcopy(hf)
    modified.add_tokens(["zqxjvk"])
    modified.save_pretrained(str(tmp_path / "modified"))
    custom = ClipTokenizer(context_length=8, tokenizer_dir=str(tmp_path / "modified"))
    assert custom.vocab_size == 49409
    assert custom("zqxjvk cat")[0, :4].tolist() == [SOT, 49408, 2368, EOT]
    assert pickle.loads(pickle.dumps(custom))("zqxjvk")[0, 1] == 49408


def test_tokenizer_dir_without_files_falls_back(tok: ClipTokenizer, tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    fallback = ClipTokenizer(32, tokenizer_dir=str(tmp_path), cache_dir=tok.cache_dir)
    np.testing.assert_array_equal(fallback(TEXTS), tok(TEXTS))
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        ClipTokenizer(tokenizer_dir=str(tmp_path / "missing"))


def test_packaged_bpe_file_is_the_openai_file() -> None:
    path = default_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = f.readline()
    assert header.startswith("\"bpe_simple_vocab_16e6.txt#version: 0.2")
    assert (path.parent / "LICENSE-CLIP-BPE.txt").is_file()
