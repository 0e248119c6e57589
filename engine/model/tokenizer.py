"""CLIP's text tokenizer: byte-level BPE, token for token the same as OpenAI's.

The algorithm (Radford et al., 2021, the released `clip` package) is GPT-2's byte-level BPE with two
changes: a word's last symbol carries the suffix ``</w>``, and text is cleaned first (ftfy, HTML
unescaped twice, whitespace collapsed, lower-cased). The vocabulary is 256 byte symbols, the same 256
with ``</w>``, 48,894 merges and the two special tokens, 49,408 ids in all:

    <|startoftext|> = 49406    <|endoftext|> = 49407    padding = 0

``tokenize(texts)`` returns ``[SOT] tokens [EOT] 0 0 ...`` rows of ``context_length`` ids. Speed comes
from a cache of word -> ids (caption vocabularies are small: after a few thousand captions almost every
word is a hit), from skipping ftfy on plain printable ASCII (where it provably changes nothing, see
``_clean``) and from filling the output tensor with one masked scatter instead of a Python loop.

Like OpenAI's tokenizer (and unlike OpenCLIP's, which spells them ``<start_of_text>``), the literal
strings ``<|startoftext|>`` and ``<|endoftext|>`` in a text become the special ids.
"""
from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.resources
import numbers
from typing import Iterable, Sequence

import ftfy
import regex
import torch


SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
# The released vocabulary file holds 262,144 merges; CLIP uses the first 49152 - 256 - 2 of them so
# that bytes (256), merges and the two special tokens fill a 49,152 + 256 = 49,408-entry embedding.
_NUM_MERGES = 49152 - 256 - 2
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

# Words (a run of letters), single digits, runs of other non-space symbols, English contractions; the
# special tokens first so they are never split. Case-insensitive as in the original (text is already
# lower-cased, so this only matters for callers of `SimpleTokenizer.words`).
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Text on which ftfy.fix_text and html.unescape are both the identity: printable ASCII without "&",
# plus tab / newline / carriage return. ftfy only rewrites non-ASCII (mojibake, quotes, widths,
# ligatures, NFC), HTML entities (need "&"), terminal escapes (need ESC) and control characters other
# than \t \n \r (\r is turned into \n, which the whitespace collapse makes equivalent).
# tests/test_tokenizer.py checks this against ftfy on random ASCII.
_NEEDS_NO_FIX = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
# Bounded work for any text (a 1 MB caption of one word made BPE, quadratic in a word's length, run
# for minutes): `tokenize` reads at most MAX_TEXT_CHARS characters of a text and gives BPE at most
# MAX_WORD_CHARS characters of a word, and stops once a row is full. Real text reaches 75 tokens long
# before 16,384 characters, and BPE's first 75 tokens of a longer word do not depend on what follows
# its first 4,096 characters (75 tokens are ~140 characters of random letters, ~600 of run-together
# English; tests/test_tokenizer.py compares such words of up to 6,000 characters with OpenCLIP's
# tokenizer), so rows are unchanged. truncate=False reads a text to the same bounds for its error.
MAX_TEXT_CHARS = 16384
MAX_WORD_CHARS = 4096
_LONG_WORD = 48  # characters from which BPE takes its heap form (SimpleTokenizer._bpe_heap)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable unicode characters (so BPE never sees spaces or
    control characters): printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards.
    Its order is the vocabulary's: the printable bytes in byte order, then the other 68."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    # Insertion order (printable bytes first, then the others) is the order of ids 0..255.
    return mapping


def _clean(text: str) -> str:
    """OpenAI's cleaning: ftfy, HTML-unescape twice, collapse whitespace, strip, lower-case."""
    if not _NEEDS_NO_FIX.fullmatch(text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    # str.split() and the original's regex r"\s+" differ only on U+001C..U+001F, which neither ftfy
    # (drops them) nor html.unescape (never produces them) lets through.
    return " ".join(text.split()).lower()


def _read_merges(path=None) -> list[tuple[str, str]]:
    if path is None:
        resource = importlib.resources.files("clipforge").joinpath("assets", _VOCAB_FILE)
        try:
            data = resource.read_bytes()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"the BPE vocabulary {resource} is missing from the clipforge package; reinstall clipforge "
                "(pip install --no-build-isolation -e .) so that engine/assets/ ships with it"
            ) from exc
    else:
        with open(path, "rb") as f:
            data = f.read()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # line 0 is "#version: 0.2"
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"the BPE vocabulary {path or _VOCAB_FILE} is not CLIP's bpe_simple_vocab_16e6 file: expected "
            f"{_NUM_MERGES} merge lines of two symbols after the version line"
        )
    return merges


class SimpleTokenizer:
    """Byte-level BPE with a word cache. Most callers want the module-level `tokenize` / `decode`."""

    def __init__(self, bpe_path: str | None = None, cache_size: int = 1 << 18):
        merges = _read_merges(bpe_path)
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TEXT, EOT_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        # UTF-8 bytes, read as Latin-1, translate one-to-one into the byte symbols.
        self._byte_table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
        self.cache_size = cache_size
        self._cache: dict[str, tuple[int, ...]] = {}
        self._specials = {SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}
        self._cache.update(self._specials)
        assert len(self.encoder) == VOCAB_SIZE and self.encoder[EOT_TEXT] == EOT_ID

    # -- BPE ---------------------------------------------------------------------------------------
    def bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one word (already byte-encoded) by rank until no merge applies."""
        if len(word) > _LONG_WORD:
            return self._bpe_heap(word)
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            # Merge every occurrence of the best pair, left to right, without overlaps.
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _bpe_heap(self, word: str) -> list[str]:
        """The same merges in O(n log n) for long words (the loop above rescans every pair after each
        merge: O(n^2), seconds at 10k characters). A heap holds every mergeable adjacent pair by (rank,
        position of its left symbol). Taking them in that order is the loop's order: all occurrences
        of the best pair left to right, non-overlapping (an entry whose symbols changed is stale), and
        a merge of rank r only creates pairs of rank > r (a merge that uses the new symbol comes later
        in the merge list), so no pending pair of rank r is ever preceded by a newer one."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        n = len(symbols)
        ranks = self.bpe_ranks
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(r, i, symbols[i], symbols[i + 1]) for i in range(n - 1)
                if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] != a or j == -1 or symbols[j] != b:
                continue  # stale: a neighbour merged since this entry was pushed
            symbols[i], symbols[j] = a + b, None
            k = nxt[i] = nxt[j]
            if k != -1:
                prv[k] = i
                r = ranks.get((symbols[i], symbols[k]))
                if r is not None:
                    heapq.heappush(heap, (r, i, symbols[i], symbols[k]))
            p = prv[i]
            if p != -1:
                r = ranks.get((symbols[p], symbols[i]))
                if r is not None:
                    heapq.heappush(heap, (r, p, symbols[p], symbols[i]))
        out, i = [], 0
        while i != -1:
            out.append(symbols[i])
            i = nxt[i]
        return out

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            encoded = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
            ids = tuple(self.encoder[s] for s in self.bpe(encoded))
            if len(self._cache) >= self.cache_size:  # bounded: forget everything but the specials
                self._cache.clear()
                self._cache.update(self._specials)
            self._cache[word] = ids
        return ids

    # -- text ------------------------------------------------------------------------------------
    def words(self, text: str) -> list[str]:
        """The cleaned text split into BPE words (before byte encoding)."""
        return _WORD_PATTERN.findall(_clean(text))

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of one text, without SOT / EOT. With `limit`, only what a row of `limit` tokens
        needs: the first MAX_TEXT_CHARS characters, words cut to MAX_WORD_CHARS for BPE, and no word
        after the one that passes `limit` tokens (the result then has more than `limit` ids when the
        text is longer, at most `limit` plus one word's)."""
        cache, ids = self._cache, []
        if limit is not None and len(text) > MAX_TEXT_CHARS:
            # whitespace first (the cleaning collapses it anyway), so a run of it cannot push the words
            # past the cut; texts within the bound take the exact path untouched
            text = " ".join(text.split())[:MAX_TEXT_CHARS]
        for word in _WORD_PATTERN.findall(_clean(text)):
            if limit is not None and len(word) > MAX_WORD_CHARS:
                word = word[:MAX_WORD_CHARS]
            hit = cache.get(word)
            ids.extend(hit if hit is not None else self._word_ids(word))
            if limit is not None and len(ids) > limit:
                break
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids, byte for byte; every id is decoded, special ones included."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]  # a negative id would index from the end
        if bad:
            raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}); got {bad[:5]}")
        symbols = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in symbols)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = True) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (room for SOT and EOT), got {context_length}")
        rows, lengths = [], []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
            ids = [SOT_ID]
            # truncate: a row's worth (bounded work); else the whole text, within the same bounds
            ids += self.encode(text, limit=context_length - 2 if truncate else max(len(text), context_length))
            ids.append(EOT_ID)
            if len(ids) > context_length:
                if not truncate:
                    at_least = "at least " if len(text) > MAX_TEXT_CHARS else ""
                    raise ValueError(
                        f"text {index} is {at_least}{len(ids)} tokens long with SOT and EOT, more than "
                        f"context_length={context_length}; shorten it or pass truncate=True"
                    )
                ids = ids[:context_length]
                ids[-1] = EOT_ID
            rows.append(ids)
            lengths.append(len(ids))
        result = torch.zeros(len(rows), context_length, dtype=torch.long)
        if rows:
            # One scatter of the concatenated ids instead of one small tensor per row.
            length = torch.tensor(lengths)
            mask = torch.arange(context_length) < length[:, None]  # (N, context_length)
            result[mask] = torch.tensor([i for ids in rows for i in ids], dtype=torch.long)
        return result


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer, built (vocabulary read) on first use rather than at import."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
             truncate: bool = True) -> torch.Tensor:
    """Tokenize one text or a list of texts exactly as OpenAI's CLIP does.

    Returns a LongTensor (N, context_length): each row is ``[49406] ids [49407]`` followed by zeros.
    A text longer than ``context_length - 2`` tokens is cut, keeping SOT and ending with EOT; with
    ``truncate=False`` it raises a ValueError naming the text's index and length instead.
    """
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)


def decode(ids) -> str | list[str]:
    """Text of tokenized ids: a 1-D sequence gives a str, a 2-D tensor / list of rows a list of str.

    SOT and padding are dropped and a row ends at its first EOT, so ``decode(tokenize(t))`` gives the
    cleaned text (lower-case, collapsed whitespace) with one space after each word.
    """
    shape = getattr(ids, "shape", None)
    if shape is not None:  # a tensor or a NumPy array: its shape, not its first element, says 1-D or 2-D
        if len(shape) not in (1, 2):
            raise ValueError(f"decode takes a 1-D or 2-D array of token ids, got shape {tuple(shape)}")
        rows = ids.tolist()
        return [_decode_row(row) for row in rows] if len(shape) == 2 else _decode_row(rows)
    ids = list(ids)
    if ids and not isinstance(ids[0], numbers.Integral):
        return [_decode_row(list(row)) for row in ids]
    return _decode_row(ids)


def _decode_row(ids: list) -> str:
    if EOT_ID in ids:
        ids = ids[: ids.index(EOT_ID)]
    return get_tokenizer().decode(i for i in ids if i != SOT_ID).rstrip(" ")
