"""Tokenizer throughput on a caption-like corpus: clipforge.tokenize vs OpenCLIP's SimpleTokenizer.

Run: pytest benchmarks/bench_tokenizer.py --benchmark-only          (CPU; no GPU needed)
  or python benchmarks/bench_tokenizer.py                           (prints captions/s)

The corpus is 20,000 generated alt-text-like captions (seeded): templates over a few hundred words,
numbers, brand-ish tokens, some accents, emoji, CJK and HTML entities, 5 to 40 words each, so the
word cache sees both repeats and a long tail. "cold" builds a fresh tokenizer (empty cache) for each
timed call and so includes every BPE merge; "warm" reuses one whose cache has seen the corpus, the
steady state of a training run. extra_info holds captions/s.
"""
from __future__ import annotations

import random
import time

import pytest
from common import shim_torchvision

N_CAPTIONS = 20_000
CONTEXT_LENGTH = 77

_ADJ = ("red blue green white black small large old new young happy wooden shiny dark bright fluffy rusty "
        "tall tiny colorful vintage modern empty crowded sunny snowy rainy beautiful delicious abstract "
        "handmade organic luxury cozy rustic minimalist").split()
_NOUN = ("dog cat man woman child boy girl car bicycle tree house beach mountain street kitchen table pizza "
         "horse bird boat train plane bus sofa laptop phone camera guitar coffee cup plate sandwich cake "
         "flower garden river bridge city skyline sunset forest lake field cow sheep elephant giraffe zebra "
         "umbrella surfboard skateboard kite clock vase book shelf window door lamp poster painting dress "
         "shirt shoes jacket necklace ring watch chair bed bathroom office restaurant market stadium").split()
_VERB = ("sitting standing running walking lying jumping riding eating looking playing holding carrying "
         "parked flying swimming sleeping waiting smiling posing displayed").split()
_PREP = "on in near next to behind under above beside across along inside outside".split()
_EXTRA = ["stock photo", "HD wallpaper", "free shipping", "2019", "4K", "close-up", "in the style of Monet",
          "Café Déjà Vu", "crème brûlée", "東京", "😀", "❤️", "&amp;", "&quot;new&quot;", "#travel", "@home",
          "it's", "they're", "vs.", "$19.99", "50% off", "x2", "1920x1080", "MacBook Pro 13\"", "IMG_2034.JPG"]


def make_corpus(n: int = N_CAPTIONS, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 4)):
            parts.append(f"a {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_PREP)} "
                         f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)}")
        if rng.random() < 0.5:
            parts.append(" ".join(rng.sample(_EXTRA, rng.randint(1, 3))))
        text = ", ".join(parts)
        if rng.random() < 0.5:
            text = text.capitalize() + "."
        captions.append(text)
    return captions


def _openclip_tokenizer():
    shim_torchvision()
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenizer.SimpleTokenizer


def _factory(provider):
    if provider == "clipforge":
        from clipforge.model.tokenizer import SimpleTokenizer

        return SimpleTokenizer
    return _openclip_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("provider", ["clipforge", "openclip"])
def test_tokenize(benchmark, corpus, provider, cache):
    factory = _factory(provider)
    if cache == "warm":
        tokenizer = factory()
        tokenizer(corpus, context_length=CONTEXT_LENGTH)
        benchmark.pedantic(tokenizer, args=(corpus,), kwargs={"context_length": CONTEXT_LENGTH},
                           rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(lambda: factory()(corpus, context_length=CONTEXT_LENGTH), rounds=3, iterations=1)
    benchmark.extra_info["captions"] = len(corpus)
    benchmark.extra_info["captions_per_s"] = len(corpus) / benchmark.stats.stats.min


def main():
    corpus = make_corpus()
    for provider in ("clipforge", "openclip"):
        factory = _factory(provider)
        build = time.perf_counter()
        tokenizer = factory()
        build = time.perf_counter() - build
        times = []
        for _ in range(3):
            start = time.perf_counter()
            tokenizer(corpus, context_length=CONTEXT_LENGTH)
            times.append(time.perf_counter() - start)
        # times[0] fills the cache (cold), the best of the rest is the steady state (warm).
        print(f"{provider:10s} build {build:.2f} s  cold {len(corpus) / times[0]:9,.0f} captions/s  "
              f"warm {len(corpus) / min(times[1:]):9,.0f} captions/s")


if __name__ == "__main__":
    main()
