"""clipforge.tokenize against OpenCLIP's tokenizer (a port of OpenAI's), bit for bit."""
import random

import ftfy
import html
import numpy as np
import pytest
import torch

import clipforge
from clipforge.model import tokenizer as tk

open_clip = pytest.importorskip("open_clip")

# Hand-written corpus: each line exercises one part of the cleaning or of the BPE.
CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   ",
    "\n\t\r\n",
    "Café, naïve façade; jalapeño crème brûlée — Ångström über straße",
    "emoji 😀🐶🏳️‍🌈 👩🏽‍💻 and flags 🇫🇷🇯🇵",
    "東京タワーの夜景 北京烤鸭 서울의 밤 ภาษาไทย",
    "Ελληνικά Кириллица עברית العربية हिन्दी",
    "fish &amp; chips",
    "fish &amp;amp; chips &amp;amp;amp; peas",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39; &#x263A; &copy;",
    "<b>tags stay</b> &amp; <i>so do these</i>",
    "many     spaces\tand\ttabs\nand\n\nnewlines\r\nand  \u00a0 nbsp \u3000 ideographic",
    "it's they're we've I'm you'll he'd don't IT'S THEY'RE",
    "rock'n'roll o'clock 'quoted' ''double''",
    "Hello, world!!! What?! ... (brackets) [more] {braces} #hashtag @user $5 100% ^_^ ~tilde~ a|b",
    "numbers 0 7 42 3.14159 1,000,000 2024-01-31 12:30pm 1st 2nd 3rd 4th 10x",
    "unicode digits ١٢٣ ४५६ ⅛ ² ③ Ⅻ",
    "mojibake: cafÃ© â€œsmartâ€\x9d quotes",
    "curly “quotes” and ‘single’ and ligatures ﬁ ﬂ and fullwidth ＡＢＣ１２３",
    "control\x00chars\x07here\x1bthere\x7f and \x0bvertical\x0cfeed",
    "combining e\u0301 a\u0308 and zero\u200bwidth\u200djoiners",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "url http://example.com/path?query=1&other=2 email someone@example.org",
    "word " * 120,
    "the quick brown fox jumps over the lazy dog; " * 20,
    "🙂" * 200,
    "trailing punctuation.",
]


@pytest.fixture(scope="module")
def reference():
    return open_clip.tokenizer.SimpleTokenizer()


def _diff(ours, theirs, texts):
    bad = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    return "\n".join(f"text {i} {texts[i]!r}:\n ours   {ours[i].tolist()}\n theirs {theirs[i].tolist()}" for i in bad[:3])


@pytest.mark.parametrize("context_length", [77, 2, 5, 33, 128])
def test_corpus_matches_openclip(reference, context_length):
    ours = clipforge.tokenize(CORPUS, context_length=context_length)
    theirs = reference(CORPUS, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), context_length)
    assert torch.equal(ours, theirs), _diff(ours, theirs, CORPUS)


def test_open_clip_tokenize_function(reference):
    assert torch.equal(clipforge.tokenize(CORPUS), open_clip.tokenize(CORPUS))


def test_single_string_and_layout():
    one = clipforge.tokenize("a photo of a cat")
    assert one.shape == (1, 77)
    row = one[0].tolist()
    n = row.index(tk.EOT_ID) + 1
    assert row[0] == tk.SOT_ID and n == 7 and all(v == 0 for v in row[n:])
    assert torch.equal(one, clipforge.tokenize(["a photo of a cat"]))
    assert clipforge.tokenize([]).shape == (0, 77)
    empty = clipforge.tokenize("")[0].tolist()
    assert empty[:3] == [tk.SOT_ID, tk.EOT_ID, 0]


def test_truncation_keeps_sot_and_ends_with_eot():
    tokens = clipforge.tokenize(["word " * 120, "short"], context_length=77)
    assert tokens[0, 0] == tk.SOT_ID and tokens[0, -1] == tk.EOT_ID
    assert (tokens[0, 1:-1] == tk.get_tokenizer().encode("word")[0]).all()


def test_truncate_false_raises_with_index_and_length():
    texts = ["fits", "word " * 80]
    with pytest.raises(ValueError, match=r"text 1 is 82 tokens long.*context_length=77"):
        clipforge.tokenize(texts, truncate=False)
    # 75 words + SOT + EOT is exactly 77: fits without truncation.
    exact = clipforge.tokenize("word " * 75, truncate=False)
    assert exact[0, -1] == tk.EOT_ID


def _long_words(seed=0):
    """Words long enough to make BPE's quadratic loop slow: random letters, run-together English,
    a mixed alphabet with multi-byte symbols, a near-periodic run (heavy on equal-rank merges)."""
    rng = random.Random(seed)
    english = "thequickbrownfoxjumpsoverthelazydoginternationalizationandmisunderstandings"
    return {
        "letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6000)),
        "english": (english * 90)[:6000],
        "mixed": "".join(rng.choice("abcé猫ßø") for _ in range(5000)),
        "periodic": ("ab" * 1500 + "aab" * 500)[:5000],
    }


def test_long_words_match_openclip(reference):
    # beyond MAX_WORD_CHARS (4096) only the first 4096 characters reach BPE: the 77-token row must not
    # change (OpenCLIP tokenizes the whole word, in ~1 s each)
    words = _long_words()
    assert all(len(w) > tk.MAX_WORD_CHARS for w in words.values())
    texts = list(words.values()) + [f"a photo of {w} and more" for w in words.values()]
    ours, theirs = clipforge.tokenize(texts), reference(texts)
    assert torch.equal(ours, theirs), _diff(ours, theirs, texts)


def test_heap_bpe_equals_the_merge_loop():
    # the O(n log n) form long words take must merge exactly as the loop does
    tok = tk.get_tokenizer()
    rng = random.Random(3)
    alphabet = "abcdefghijklmnopqrstuvwxyzé猫0!"
    for _ in range(400):
        letters = alphabet[:rng.randint(2, len(alphabet))]
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 200)))
        enc = word.encode("utf-8").decode("latin-1").translate(tok._byte_table)
        symbols = list(enc[:-1]) + [enc[-1] + "</w>"]
        loop = tok.bpe(enc) if len(enc) <= tk._LONG_WORD else None
        if loop is None:  # run the loop form by hand on a long word
            saved, tk._LONG_WORD = tk._LONG_WORD, 10**9
            try:
                loop = tok.bpe(enc)
            finally:
                tk._LONG_WORD = saved
        assert tok._bpe_heap(enc) == loop, word
        assert "".join(loop) == "".join(symbols)


def test_a_megabyte_caption_is_bounded_work(reference):
    import time

    rng = random.Random(7)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000))
    clipforge.tokenize("warm up")  # the vocabulary is read once
    cases = {  # text -> the text cut to what tokenize reads, for the reference (1 MB takes it hours)
        word: word[:tk.MAX_WORD_CHARS],
        "a photo of " + word: "a photo of " + word[:tk.MAX_WORD_CHARS],
        "&amp;" * 200_000: None,
        "\u732b" * 1_000_000: None,
        "a " * 500_000: None,
    }
    for text, cut in cases.items():
        start = time.perf_counter()
        ours = clipforge.tokenize(text)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.1, f"{text[:12]!r}... ({len(text)} characters) took {elapsed:.3f} s"
        if cut is not None:
            assert torch.equal(ours, reference([cut])), text[:30]
    assert clipforge.tokenize("a " * 500_000)[0, 1:76].eq(320).all()  # "a" x 75, then EOT
    # a run of whitespace before the words cannot push them past the cut
    for pad in (" " * 20_000, "\n\t " * 10_000):
        assert torch.equal(clipforge.tokenize(pad + "a photo of a cat"), reference(["a photo of a cat"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        clipforge.tokenize("x", context_length=1)
    with pytest.raises(TypeError, match="text 1 is a int"):
        clipforge.tokenize(["ok", 3])


def test_literal_special_tokens_follow_openai():
    # OpenAI's tokenizer maps the literal strings to the special ids (OpenCLIP spells its specials
    # <start_of_text>/<end_of_text> instead, so this is the one place the two differ).
    word = tk.get_tokenizer().encode("cat")
    assert clipforge.tokenize("cat <|endoftext|>")[0, :4].tolist() == [tk.SOT_ID, *word, tk.EOT_ID, tk.EOT_ID]
    assert clipforge.tokenize("<|startoftext|>cat")[0, :4].tolist() == [tk.SOT_ID, tk.SOT_ID, *word, tk.EOT_ID]


def _random_text(rng):
    # Code points from the blocks captions draw on, plus any valid code point now and then.
    blocks = [(0x20, 0x7E), (0x20, 0x7E), (0x00, 0x20), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x52F),
              (0x600, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x2100, 0x218F), (0x3000, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF),
              (0x0, 0x10FFFF)]
    chars = []
    for _ in range(rng.randrange(0, 90)):
        r = rng.random()
        if r < 0.08:
            chars.append(rng.choice(["&amp;", "&amp;amp;", "&lt;", "&#39;", "&#x1F600;", "&nbsp;", "'s", "'re"]))
            continue
        if r < 0.2:
            chars.append(rng.choice(" \t\n"))
            continue
        lo, hi = rng.choice(blocks)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be UTF-8 encoded; neither tokenizer takes them
            cp = 0x41
        chars.append(chr(cp))
    return "".join(chars)


def test_random_unicode_matches_openclip(reference):
    rng = random.Random(1234)
    texts = [_random_text(rng) for _ in range(400)]
    ours = clipforge.tokenize(texts, context_length=40)
    theirs = reference(texts, context_length=40)
    assert torch.equal(ours, theirs), _diff(ours, theirs, texts)


def test_random_ascii_matches_openclip_and_ftfy_shortcut(reference):
    # Plain ASCII skips ftfy; check the shortcut against ftfy itself and the whole path against OpenCLIP.
    rng = random.Random(99)
    alphabet = [chr(c) for c in range(128)] + ["&amp;", "&lt;", "\x1b[31m", "\r\n"] + list("aeiou st") * 8
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(400)]
    for text in texts:
        full = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert tk._clean(text) == full, repr(text)
    ours = clipforge.tokenize(texts, context_length=50)
    theirs = reference(texts, context_length=50)
    assert torch.equal(ours, theirs), _diff(ours, theirs, texts)


def test_small_cache_gives_same_tokens(reference):
    small = tk.SimpleTokenizer(cache_size=4)
    assert torch.equal(small(CORPUS * 2), reference(CORPUS * 2))
    assert len(small._cache) <= 4 + 2  # the bound, plus the two special tokens kept on eviction


def test_decode_round_trip(reference):
    texts = ["A photo of a CAT!", "Café 😀 東京 it's", "", "word " * 100]
    tokens = clipforge.tokenize(texts)
    decoded = tk.decode(tokens)
    assert decoded[0] == "a photo of a cat !"
    assert decoded[1] == "café 😀 東京 it 's"
    assert decoded[2] == ""
    assert decoded[3] == " ".join(["word"] * 75)
    assert tk.decode(tokens[1]) == decoded[1]
    # Re-tokenizing decoded text gives the same ids (the decoded text is already clean).
    assert torch.equal(clipforge.tokenize(decoded[:2]), tokens[:2])
    # The raw decoder agrees with OpenCLIP's on every id, special ones included.
    ids = list(range(0, tk.VOCAB_SIZE, 97)) + [tk.SOT_ID, tk.EOT_ID]
    assert tk.get_tokenizer().decode(ids) == reference.decode(ids).replace("<start_of_text>", tk.SOT_TEXT).replace(
        "<end_of_text>", tk.EOT_TEXT
    )
    for bad in ([tk.VOCAB_SIZE], [-1]):  # -1 must not wrap around to the last id
        with pytest.raises(ValueError, match="token ids"):
            tk.get_tokenizer().decode(bad)


def test_decode_takes_arrays_by_shape():
    tokens = clipforge.tokenize(["a red car", "two dogs"])
    want = ["a red car", "two dogs"]
    assert tk.decode(tokens.numpy()) == want  # NumPy elements are not Python ints
    assert tk.decode(tokens[0].numpy()) == want[0]
    assert tk.decode([list(map(np.int64, row)) for row in tokens.tolist()]) == want
    assert tk.decode(tokens[:0]) == [] and tk.decode(tokens[:0].numpy()) == []  # no rows, not one empty row
    assert tk.decode([]) == ""
    with pytest.raises(ValueError, match="1-D or 2-D"):
        tk.decode(tokens[None])
