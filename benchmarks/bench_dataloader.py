"""Data loader throughput: DALI vs PyTorch DataLoader + Pillow at equal thread counts, 256² and 512² JPEGs.

    pytest benchmarks/bench_dataloader.py --benchmark-json out.json
    python benchmarks/bench_dataloader.py [--threads 2] [--rounds 5]   # one interleaved run, a table, the ratio

What one round measures: a whole training epoch through `clipforge.data.build_train_loader` (pipeline
or worker start-up included), batch 64, random resized crop to 224 (bicubic, area 0.9-1.0), CLIP
normalisation to float32 (B, 3, 224, 224), captions tokenized by `clipforge.tokenize`. Providers:
- `dali`: loader "dali" as configured by default: `num_workers` DALI CPU threads, captions tokenized
  by one background thread (`token_workers: 0`), batches handed out without a copy;
- `pytorch`: loader "pytorch", `num_workers` DataLoader worker processes (decode + crop + normalise +
  tokenize each batch);
- `dali-pipeline`: the same DALI graph run bare, built once (no tokens, no per-epoch index or
  pipeline): the ceiling of `dali`;
- `pillow-loop`: one thread, decode + crop + normalise per image in a Python loop (no tokens).
The data: synthetic photo-like JPEGs (colour waves + blurred noise, quality 90, ~ 25 KB at 256²),
written by make-shards into `$CLIPFORGE_BENCH_DATA` (default .cache/bench_dataloader), reused.

The script interleaves the providers round by round, so load from other processes on a shared
machine hits all of them alike, and prints best and median images/s with DALI / PyTorch ratios.
Tokenizer throughput (captions/s) is measured alongside: it decides where tokenization may run.
GPU (device="mixed", nvJPEG) decoding is not measured here: DALI's wheel is not on the GPU machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = {256: 4096, 512: 1536}  # JPEG side -> images in the data set (epochs long enough to hide start-up)
PROVIDERS = ["dali", "pytorch", "dali-pipeline", "pillow-loop"]
BATCH, OUT_SIZE = 64, 224


def _have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _photo(rng, side: int):
    from PIL import Image, ImageFilter

    y, x = np.mgrid[0:side, 0:side] / side
    f = rng.uniform(3, 9, size=2)
    base = np.stack([128 + 90 * np.sin(f[0] * x + c) * np.cos(f[1] * y - c) for c in range(3)], -1)
    noise = np.kron(rng.normal(0, 22, (side // 4, side // 4, 3)), np.ones((4, 4, 1)))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


_WORDS = ("photo picture image cat dog bird tree house car street beach mountain river city night sunset "
          "red blue green small large old young happy running sitting standing view people woman man child "
          "table chair window garden flower field snow winter summer boat train bridge").split()


def caption(rng) -> str:
    n = int(rng.integers(5, 16))
    return "a " + " ".join(rng.choice(_WORDS, n)) + f" number {int(rng.integers(0, 10**6))}"


def dataset(side: int) -> str:
    """make-shards output of SIDES[side] photo-like JPEGs (built once, then reused)."""
    from clipforge.data.make_shards import MakeShardsConfig, make_shards

    base = os.environ.get("CLIPFORGE_BENCH_DATA", os.path.join(ROOT, ".cache", "bench_dataloader"))
    out = os.path.join(base, f"shards{side}-{SIDES[side]}")
    if os.path.isfile(os.path.join(out, "stats.json")):
        return out
    src = os.path.join(base, f"src{side}-{SIDES[side]}")
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(side)
    for i in range(SIDES[side]):
        _photo(rng, side).save(os.path.join(src, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(src, f"{i:06d}.txt"), "w") as f:
            f.write(caption(rng))
    make_shards(MakeShardsConfig(src, out, shard_size=256, progress=False))
    return out


def _loader(shards: str, backend: str, threads: int):
    import clipforge
    from clipforge.data import DataConfig, build_train_loader

    cfg = DataConfig(path=shards, batch_size=BATCH, loader=backend, num_workers=threads, seed=0)
    return build_train_loader(cfg, 0, 1, 0, 0, OUT_SIZE, clipforge.tokenize)


def _dali_pipeline(shards: str, threads: int):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from clipforge.data import CLIP_MEAN, CLIP_STD, expand_shards

    paths = expand_shards(shards)
    pipe = Pipeline(batch_size=BATCH, num_threads=threads, device_id=None, seed=0)
    with pipe:
        jpegs = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths], ext=["jpg"],
                                      name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=(OUT_SIZE, OUT_SIZE), random_area=[0.9, 1.0],
                                        interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])
        pipe.set_outputs(images)
    pipe.build()
    return pipe


def _pillow_loop(shards: str):
    from clipforge.data import build_catalog, normalize_uint8, pil_decode, pil_transform

    cat = build_catalog(shards)
    rng = np.random.default_rng(0)
    shards = [cat.shard(i) for i in range(len(cat.refs))]
    items = [(s.files[0], int(r["img_off"]), int(r["img_size"])) for s in shards for r in s.table]
    fds = {p: os.open(p, os.O_RDONLY) for p in {i[0] for i in items}}

    def epoch():
        n = 0
        for b in range(0, len(items), BATCH):
            batch = [pil_transform(pil_decode(os.pread(fds[p], size, off)), OUT_SIZE, train=True, rng=rng)
                     for p, off, size in items[b:b + BATCH]]
            n += len(normalize_uint8(torch.from_numpy(np.stack(batch))))
        return n

    return epoch


def runner(provider: str, side: int, threads: int):
    """A callable running one epoch of `provider` and returning the number of images it produced."""
    shards = dataset(side)
    if provider in ("dali", "dali-pipeline") and not _have_dali():
        pytest.skip("DALI is not installed")
    if provider in ("dali", "pytorch"):
        loader = _loader(shards, provider, threads)
        return lambda: sum(len(images) for images, _ in loader)
    if provider == "dali-pipeline":
        pipe = _dali_pipeline(shards, threads)
        n = SIDES[side]

        def epoch():
            done = 0
            while done < n:
                (out,) = pipe.run()
                done += len(out)
            return n

        return epoch
    return _pillow_loop(shards)


def tokenizer_rate(n: int = 20000) -> float:
    import clipforge

    rng = np.random.default_rng(1)
    caps = [caption(rng) for _ in range(n)]
    clipforge.tokenize(caps[:BATCH])
    t = time.perf_counter()
    for b in range(0, n, BATCH):
        clipforge.tokenize(caps[b:b + BATCH])
    return n / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------- pytest-benchmark

@pytest.mark.parametrize("provider, threads", [("dali", 2), ("pytorch", 2), ("dali-pipeline", 2), ("pillow-loop", 1)])
@pytest.mark.parametrize("side", sorted(SIDES))
def test_loader_throughput(benchmark, side, provider, threads):
    epoch = runner(provider, side, threads)
    n = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(images=n, threads=threads, side=side,
                                images_per_s=n / benchmark.stats.stats.median,
                                images_per_s_best=n / benchmark.stats.stats.min)


def test_tokenizer_throughput(benchmark):
    rate = benchmark.pedantic(tokenizer_rate, rounds=3, iterations=1)
    benchmark.extra_info["captions_per_s"] = rate


# ------------------------------------------------------------------------------------- script

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sides", type=int, nargs="+", default=sorted(SIDES))
    p.add_argument("--providers", nargs="+", default=PROVIDERS)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads={args.threads}, rounds={args.rounds}, "
          f"batch {BATCH}, crop {OUT_SIZE}", flush=True)
    rates: dict = {}
    for side in args.sides:
        epochs = {pr: runner(pr, side, 1 if pr == "pillow-loop" else args.threads) for pr in args.providers}
        for fn in epochs.values():  # warm-up: page cache, imports
            fn()
        for _ in range(args.rounds):
            for pr, fn in epochs.items():
                t = time.perf_counter()
                n = fn()
                rates.setdefault((side, pr), []).append(n / (time.perf_counter() - t))
        del epochs
    print(f"{'side':>5} {'provider':<14} {'threads':>7} {'best img/s':>10} {'median':>8}")
    for (side, pr), r in rates.items():
        print(f"{side:>5} {pr:<14} {1 if pr == 'pillow-loop' else args.threads:>7} {max(r):>10.0f} "
              f"{statistics.median(r):>8.0f}")
    for side in args.sides:
        if (side, "dali") in rates and (side, "pytorch") in rates:
            d, t = rates[side, "dali"], rates[side, "pytorch"]
            print(f"{side}²: DALI / PyTorch = {max(d) / max(t):.2f}x (best), "
                  f"{statistics.median(d) / statistics.median(t):.2f}x (median)")
    print(f"clipforge.tokenize: {tokenizer_rate():.0f} captions/s (one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
