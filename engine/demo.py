"""The README's first command: train, evaluate and embed a tiny CLIP on bundled real data, with the real stack.

    bash scripts/demo.sh            # = bash scripts/setup.sh, then python -m clipforge.demo

1. Data (set-up work, done once): scikit-learn's handwritten digits (1,797 real 8x8 scans that ship
   inside the package) are upscaled to 32x32 ink-on-paper JPEGs. A stratified 80/20 split keeps 359
   images out of training. Each training image is paired with several varied captions ("a handwritten
   seven", "the digit 7 written in ink", ...) and written as webdataset shards by `clipforge
   make-shards`; the held-out images go into an ImageFolder whose folders are label ids only (0..9):
   their classes get names only at evaluation. A manifest records what was generated; a later run
   whose manifest, shards and held-out files still match skips the work.
2. Training (run config `clipforge/assets/demo.yaml`, shipped in the package): `deepspeed --num_gpus 2
   --module clipforge.train` (two gloo ranks on CPU), ZeRO stage 2, the DALI CPU pipeline over the
   shards, gradient caching (a micro-batch of 16 pairs per rank inside a contrastive batch of 64), the
   C++ contrastive loss (clipforge._C).
3. Evaluation: `clipforge.load` opens the exported weights; zero-shot classification of the held-out
   images with a classifier built at evaluation time from the class names and the shipped `digits`
   prompt templates (prompt ensembling); accuracy, per-class recall and a confusion-matrix PNG.
4. Embedding: one held-out image per digit and ten captions through `model.embed_images` /
   `model.embed_texts`; the cosine-similarity table is printed and saved.

Each run writes into a new `runs/demo-<timestamp>` (an existing `--output-dir` is refused unless
`--force`, which says what it replaces), and the run's files are listed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Training captions: {w} is the digit's name, {d} the numeral (both forms appear in real captions).
CAPTION_TEMPLATES = [
    "a handwritten {w}",
    "the digit {d} written in ink",
    "a scan of the number {w}",
    "a small picture of a {d}",
    "the number {d}, written by hand",
    "a {w} drawn with a pen",
    "a black and white image of the digit {w}",
    "handwriting: the number {d}",
]
# Evaluation: class names given only now, written into the shipped "digits" template set and averaged
# in embedding space (prompt ensembling); none of these templates is a training caption verbatim.
EVAL_TEMPLATES = "digits"
EXAMPLE_CAPTIONS = [f"a handwritten {w}" for w in NAMES]
DATA_FORMAT = "clipforge-demo-data/1"  # bump when the generator changes: existing data is then rebuilt
IMAGE_SIZE = 32
JPEG_QUALITY = 95


class DemoError(RuntimeError):
    """A demo stage failed; the message says which and where its log is."""


def default_config() -> str:
    """The demo's run config, shipped as package data (clipforge/assets/demo.yaml): the demo never reads
    a repository checkout."""
    from importlib.resources import files

    return os.fspath(files("clipforge").joinpath("assets", "demo.yaml"))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ data
def digit_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 ink-on-paper images (N, size, size) and labels (N,)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8), ink in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]  # (N, S, S)
    pixels = np.rint((1.0 - x.clamp(0, 1).numpy()) * 255).astype(np.uint8)  # dark ink on white paper
    return pixels, d.target.astype(np.int64)


def split_heldout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (train indices, held-out indices), `fraction` of every class held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def captions_for(label: int, k: int, rng: np.random.Generator) -> list[str]:
    """k different captions of one digit, templates drawn without replacement."""
    picks = rng.choice(len(CAPTION_TEMPLATES), size=k, replace=False)
    return [CAPTION_TEMPLATES[t].format(w=NAMES[label], d=label) for t in picks]


def _data_params(seed: int, captions_per_image: int, heldout_fraction: float, shard_size: int) -> dict:
    """Everything the generated data depends on: a changed value means the data must be made again."""
    from sklearn.datasets import load_digits

    d = load_digits()  # the source scans themselves, so another scikit-learn's digits would be noticed
    digest = hashlib.sha256(d.images.astype(np.float64).tobytes() + d.target.astype(np.int64).tobytes()).hexdigest()
    return {"format": DATA_FORMAT, "image_size": IMAGE_SIZE, "jpeg_quality": JPEG_QUALITY, "seed": seed,
            "captions_per_image": captions_per_image, "heldout_fraction": heldout_fraction,
            "shard_size": shard_size, "templates": CAPTION_TEMPLATES, "digits_sha256": digest}


def _manifest_path(data_dir: str) -> str:
    return os.path.join(data_dir, "manifest.json")


def data_is_current(data_dir: str, params: dict) -> str | None:
    """None if `data_dir` holds exactly the data `params` describe, else why not (one phrase)."""
    try:
        with open(_manifest_path(data_dir)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no data yet"
    except (OSError, json.JSONDecodeError):
        return "its manifest is unreadable"
    if manifest.get("params") != params:
        return "it was made with other settings"
    try:
        with open(os.path.join(data_dir, "train", "stats.json")) as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError):
        return "the training shards' stats.json is missing"
    for shard in stats.get("shards", []):
        tar = os.path.join(data_dir, "train", shard["name"])
        if not os.path.isfile(tar) or os.path.getsize(tar) != shard["bytes"]:
            return f"shard {shard['name']} is missing or changed"
        if not os.path.isfile(os.path.splitext(tar)[0] + ".idx"):
            return f"the index of shard {shard['name']} is missing"
    if stats.get("count") != manifest.get("train_samples"):
        return "the shards do not hold the expected samples"
    for name, count in manifest.get("heldout_per_class", {}).items():
        folder = os.path.join(data_dir, "heldout", name)
        if not os.path.isdir(folder) or len(os.listdir(folder)) != count:
            return f"held-out folder {name} is missing or changed"
    return None


def prepare_data(data_dir: str, *, seed: int = 0, captions_per_image: int = 4, heldout_fraction: float = 0.2,
                 shard_size: int = 1000) -> dict:
    """Make the demo data set in `data_dir` unless it is already there and intact; returns its manifest.

    Layout: train/ (NNNNN.tar + .idx + stats.json from `clipforge make-shards`), heldout/<label>/*.jpg,
    manifest.json. Built in a temporary folder beside it and moved into place, so an interrupted run
    never leaves half a data set that looks complete.
    """
    from PIL import Image

    from .data import make_shards as shards

    params = _data_params(seed, captions_per_image, heldout_fraction, shard_size)
    why = data_is_current(data_dir, params)
    if why is None:
        with open(_manifest_path(data_dir)) as f:
            manifest = json.load(f)
        _say(f"data: up to date in {data_dir} ({manifest['train_samples']} training pairs, "
             f"{manifest['heldout_images']} held-out images), nothing to do")
        return manifest

    _say(f"data: building in {data_dir} ({why})")
    t0 = time.time()
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(data_dir))}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    src = os.path.join(tmp, "src")
    os.makedirs(src)

    pixels, labels = digit_images()
    train_idx, held_idx = split_heldout(labels, heldout_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    # training pairs: every image k times, each time with another caption (the crop differs per epoch)
    n_pairs = 0
    for i in train_idx:
        jpeg = _encode_jpeg(Image.fromarray(pixels[i], "L"))
        for j, caption in enumerate(captions_for(int(labels[i]), captions_per_image, rng)):
            stem = os.path.join(src, f"{i:04d}_{j}")
            with open(stem + ".jpg", "wb") as f:
                f.write(jpeg)
            with open(stem + ".txt", "w", encoding="utf-8") as f:
                f.write(caption)
            n_pairs += 1
    per_class = {}
    for i in held_idx:
        folder = os.path.join(tmp, "heldout", str(int(labels[i])))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:04d}.jpg"), "wb") as f:
            f.write(_encode_jpeg(Image.fromarray(pixels[i], "L")))
        per_class[str(int(labels[i]))] = per_class.get(str(int(labels[i])), 0) + 1

    status = shards.main([src, os.path.join(tmp, "train"), "--shard-size", str(shard_size), "--quiet"])
    if status != 0:
        raise DemoError(f"clipforge make-shards failed on {src} (exit {status})")
    with open(os.path.join(tmp, "train", "stats.json")) as f:
        stats = json.load(f)
    if stats["count"] != n_pairs:
        raise DemoError(f"clipforge make-shards kept {stats['count']} of {n_pairs} demo pairs "
                        f"(skipped: {stats['skipped']}); see {tmp}/train/stats.json")
    shutil.rmtree(src)
    manifest = {"params": params, "train_images": int(len(train_idx)), "train_samples": n_pairs,
                "heldout_images": int(len(held_idx)), "heldout_per_class": dict(sorted(per_class.items())),
                "class_names": NAMES, "heldout_ids": [int(i) for i in held_idx]}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    os.replace(tmp, data_dir)
    _say(f"data: {n_pairs} training pairs ({len(train_idx)} images x {captions_per_image} captions) in "
         f"{len(stats['shards'])} shards, {len(held_idx)} held-out images ({time.time() - t0:.0f}s)")
    return manifest


def _encode_jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- run folder
def make_run_dir(output_dir: str | None, runs_root: str, force: bool) -> str:
    """A fresh run folder: runs_root/demo-<timestamp> (never reused), or `output_dir`, which must not
    hold files unless `force` (then its old contents are removed, and the demo says so)."""
    if output_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = os.path.join(runs_root, f"demo-{stamp}"), 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(runs_root, f"demo-{stamp}-{n}")
        os.makedirs(path)
        _say(f"run folder: {path} (new)")
        return path
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not force:
            raise DemoError(f"output folder {output_dir} already holds a run; choose another --output-dir, "
                            "drop --output-dir for a new runs/demo-<timestamp>, or pass --force to replace it")
        _say(f"run folder: {output_dir} held an earlier run; replacing it (--force)")
        shutil.rmtree(output_dir)
    else:
        _say(f"run folder: {output_dir}")
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


# ------------------------------------------------------------------------------------- training
def launcher() -> list[str]:
    """The deepspeed launcher, run by this interpreter: `python -m deepspeed.launcher.runner` is what the
    `deepspeed` script runs, and it starts the ranks with the same interpreter, so they import this
    environment's clipforge whatever `deepspeed` script is first on PATH."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise DemoError(f"deepspeed is not installed for {sys.executable}; run bash scripts/setup.sh "
                        "(or pip install 'clipforge[train]')")
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def train(config: str, run_dir: str, data_dir: str, *, ranks: int, max_steps: int | None, overrides=()) -> None:
    """Launch `deepspeed --num_gpus RANKS --module clipforge.train` on the demo shards; the launcher's
    output goes to the console and to run_dir/train.log."""
    from .train.distributed import free_port, remove_shm_buffers

    port = free_port()
    launch = launcher()
    cmd = [*launch, "--num_gpus", str(ranks), "--master_port", str(port), "--module", "clipforge.train",
           "--config", config, "--output-dir", run_dir, "--set", f"data.path={os.path.join(data_dir, 'train')}"]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps), "--set", f"schedule.total_steps={max_steps}"]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ)
    # one OpenMP thread per rank: the ranks (and DALI's threads) already share the cores
    env.setdefault("OMP_NUM_THREADS", "1")
    # DeepSpeed JIT-builds its CPU ops into TORCH_EXTENSIONS_DIR when set (scripts/demo.sh sets it), else
    # into torch's own default (~/.cache/torch_extensions): never into a source tree
    env["PYTHONUNBUFFERED"] = "1"
    log_path = os.path.join(run_dir, "train.log")
    shown = " ".join(cmd[len(launch):len(launch) + 7])
    _say(f"training: deepspeed {shown} ... (full command and output in {log_path})")
    with open(log_path, "wb") as log:
        log.write((" ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        console = _Console()
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            console.feed(chunk)
        console.feed(b"", final=True)
        status = proc.wait()
    # Each rank unlinks its own buffers at exit (clipforge.train.shutdown_distributed); this catches
    # those of a rank that died first. The port was free when this launch began, so files carrying it
    # belong to this launch only.
    remove_shm_buffers("127.0.0.1", port)
    if status != 0:
        raise DemoError(f"training failed (exit {status}); see {log_path}")


class _Console:
    """Forwards the launcher's output to the console without DeepSpeed's start-up chatter and Python
    warnings (all of it stays in train.log); tqdm's carriage-return updates pass through."""

    NOISE = re.compile(rb"^\s*(\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\]|\S+\.py:\d+: \w*Warning:"
                       rb"|return func\(\*args|DeepSpeed deepspeed\.ops\.\S+ built successfully)")

    WARNING = re.compile(rb"(?:/[\w.\-]+)+\.py:\d+: \w*Warning:[^\r\n]*\n")

    def __init__(self):
        self.pending = b""

    def feed(self, chunk: bytes, final: bool = False) -> None:
        parts = re.split(rb"(?<=[\r\n])", self.pending + chunk)  # pieces ending in \r or \n
        self.pending = b"" if final else parts.pop()
        parts = [self.WARNING.sub(b"", p) for p in parts]  # a warning can follow a progress update
        kept = [p for p in parts if p and not self.NOISE.match(p.lstrip(b"\r"))]
        if kept:
            sys.stdout.buffer.write(b"".join(kept))
            sys.stdout.buffer.flush()


# ---------------------------------------------------------------------------------- evaluation
def evaluate(run_dir: str, data_dir: str) -> dict:
    """Zero-shot top-1 on the held-out images: classifier from the class names + prompt ensembling."""
    import clipforge
    from clipforge.serve.evaluate import zeroshot_eval
    from clipforge.serve.prompts import get_templates

    model = clipforge.load(os.path.join(run_dir, "model.safetensors"))
    templates = get_templates(EVAL_TEMPLATES)
    _say(f"zero-shot: {len(NAMES)} class names x {len(templates)} '{EVAL_TEMPLATES}' templates "
         f"(e.g. {templates[1].format(NAMES[7])!r}), averaged per class")
    report = zeroshot_eval(model, os.path.join(data_dir, "heldout"), classes=NAMES, templates=templates,
                           progress=False, confusion_png=os.path.join(run_dir, "zeroshot_confusion.png"))
    report["templates_used"] = templates
    with open(os.path.join(run_dir, "zeroshot.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def embed_examples(run_dir: str, data_dir: str) -> np.ndarray:
    """One held-out image per digit and ten captions through the embedding API -> (10, 10) cosine table."""
    import clipforge

    model = clipforge.load(os.path.join(run_dir, "model.safetensors"))
    images = []
    for c in range(len(NAMES)):
        folder = os.path.join(data_dir, "heldout", str(c))
        images.append(os.path.join(folder, sorted(os.listdir(folder))[0]))
    img = model.embed_images(images, progress=False)  # (10, E) float32, L2-normalised
    txt = model.embed_texts(EXAMPLE_CAPTIONS, progress=False)  # (10, E)
    sim = img @ txt.T
    np.savez(os.path.join(run_dir, "examples.npz"), image_embeddings=img, text_embeddings=txt, similarity=sim,
             images=np.array(images), captions=np.array(EXAMPLE_CAPTIONS))
    print("\ncosine similarity: one held-out image per digit (rows) vs caption 'a handwritten <digit>' (columns)")
    print("      " + " ".join(f"{w[:5]:>6}" for w in NAMES))
    for c in range(len(NAMES)):
        row = " ".join(("*" if sim[c].argmax() == j else " ") + f"{sim[c, j]:5.2f}" for j in range(len(NAMES)))
        print(f"{NAMES[c]:>5} {row}")
    return sim


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipforge.demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="run config (default: the packaged clipforge/assets/demo.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the config's max_steps)")
    p.add_argument("--ranks", type=int, default=2, help="ranks the deepspeed launcher starts (default 2)")
    p.add_argument("--data-dir", default="data/demo", help="where the demo data set is made once (default data/demo)")
    p.add_argument("--runs-dir", default="runs", help="each run gets RUNS_DIR/demo-<timestamp> (default runs)")
    p.add_argument("--output-dir", default=None, help="a run folder of your choice instead (refused if it holds files)")
    p.add_argument("--force", action="store_true", help="with --output-dir: replace the run already there")
    p.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a training config key (repeatable), as in clipforge.train")
    p.add_argument("--data-only", action="store_true", help="only make (or check) the data set, then stop")
    args = p.parse_args(argv)
    config = args.config or default_config()
    t0 = time.time()
    try:
        if not os.path.isfile(config):
            raise DemoError(f"run config {config} not found" + (
                "; pass an existing file with --config" if args.config else
                ": this clipforge installation lacks its package data; reinstall it (pip install .)"))
        prepare_data(args.data_dir)
        if args.data_only:
            return 0
        run_dir = make_run_dir(args.output_dir, args.runs_dir, args.force)
        t_train = time.time()
        train(os.path.abspath(config), os.path.abspath(run_dir), os.path.abspath(args.data_dir), ranks=args.ranks,
              max_steps=args.max_steps, overrides=args.set)
        t_train = time.time() - t_train
        report = evaluate(run_dir, args.data_dir)
        embed_examples(run_dir, args.data_dir)
    except DemoError as exc:
        print(f"[demo] error: {exc}", file=sys.stderr)
        return 1
    steps = _last_step(run_dir)
    print(f"\nzero-shot top-1 on {report['images']} held-out digits (never seen in training): "
          f"{report['top1']:.1%} (top-5 {report['top5']:.1%}, chance 10%)")
    print(f"trained {steps} steps in {t_train:.0f}s; demo total {time.time() - t0:.0f}s\n")
    print(f"written to {run_dir}/:")
    for name, what in [("model.safetensors", "final weights: clipforge.load(path)"),
                       ("checkpoints/", "DeepSpeed ZeRO checkpoint (--resume)"),
                       ("metrics.jsonl", "one JSON line per step"),
                       ("loss_curve.png", "training loss"),
                       ("zeroshot_confusion.png", "held-out confusion matrix"),
                       ("zeroshot.json", "accuracy, per-class recall, confusion matrix"),
                       ("examples.npz", "example image/caption embeddings and their similarities"),
                       ("config.yaml", "the resolved run config"),
                       ("train.log", "the launcher's full output")]:
        mark = "" if os.path.exists(os.path.join(run_dir, name)) else "   (missing!)"
        print(f"  {name:<24} {what}{mark}")
    return 0


def _last_step(run_dir: str) -> int:
    step = 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                step = json.loads(line)["step"]
    return step


if __name__ == "__main__":
    sys.exit(main())
