"""The README demo (clipforge.demo): the bundled digits data set made once and checked, run folders
never clobbered silently, and a shortened end-to-end run through the real stack (deepspeed launcher,
2 ranks, ZeRO 2, DALI, gradient caching, C++ loss) that must classify held-out digits well above chance.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipforge import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo") / "data")
    demo.prepare_data(path)
    return path


def _mtimes(root: str) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def _train_sources(data_dir: str) -> list[tuple[int, str]]:
    """(digits image id, caption) of every training pair, read back from the shards."""
    from clipforge.serve.datasets import _webdataset_samples

    out = []
    for _, comps in _webdataset_samples(os.path.join(data_dir, "train")):
        meta = json.loads(comps["json"])
        out.append((int(os.path.basename(meta["url"]).split("_")[0]), comps["txt"].decode()))
    return out


def test_data_split_captions_and_shards(data_dir):
    pixels, labels = demo.digit_images()
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    pairs = _train_sources(data_dir)
    train_ids = {i for i, _ in pairs}
    held = set(manifest["heldout_ids"])
    assert not train_ids & held, "a held-out digit was written into the training shards"
    assert train_ids | held == set(range(len(labels)))
    assert len(pairs) == manifest["train_samples"] == 4 * len(train_ids)
    # held-out folders are label ids only; each file's label matches scikit-learn's
    for c in range(10):
        for name in os.listdir(os.path.join(data_dir, "heldout", str(c))):
            assert labels[int(name.split(".")[0])] == c
    assert 0.18 < len(held) / len(labels) < 0.22
    # captions vary and name the right digit (as a word or a numeral)
    for i, caption in pairs[:400]:
        c = int(labels[i])
        assert demo.NAMES[c] in caption.split() or str(c) in caption.replace(",", " ").split(), caption
    assert len({cap for _, cap in pairs}) >= 10 * len(demo.CAPTION_TEMPLATES) - 5
    stats = json.load(open(os.path.join(data_dir, "train", "stats.json")))
    assert stats["validated"] and stats["skipped_total"] == 0 and len(stats["shards"]) >= 2


def test_data_is_made_once_and_rebuilt_when_damaged(data_dir, tmp_path, capsys):
    before = _mtimes(data_dir)
    demo.prepare_data(data_dir)
    assert "up to date" in capsys.readouterr().out
    assert _mtimes(data_dir) == before  # nothing rewritten

    params = demo._data_params(0, 4, 0.2, 1000)
    assert demo.data_is_current(data_dir, params) is None
    assert "other settings" in demo.data_is_current(data_dir, demo._data_params(1, 4, 0.2, 1000))
    # a damaged copy (a truncated shard, a lost held-out image) is detected and rebuilt
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(data_dir, copy)
    with open(os.path.join(copy, "train", "00001.tar"), "r+b") as f:
        f.truncate(4096)
    assert "00001.tar" in demo.data_is_current(copy, params)
    os.remove(os.path.join(copy, "heldout", "3", sorted(os.listdir(os.path.join(copy, "heldout", "3")))[0]))
    demo.prepare_data(copy)
    assert "building" in capsys.readouterr().out
    assert demo.data_is_current(copy, params) is None
    assert os.path.getsize(os.path.join(copy, "train", "00001.tar")) > 4096


def test_run_folders_are_never_clobbered_silently(tmp_path, capsys):
    a = demo.make_run_dir(None, str(tmp_path), force=False)
    b = demo.make_run_dir(None, str(tmp_path), force=False)
    assert a != b and os.path.basename(a).startswith("demo-") and os.path.isdir(b)
    with open(os.path.join(a, "metrics.jsonl"), "w") as f:
        f.write("{}\n")
    with pytest.raises(demo.DemoError, match="already holds a run"):
        demo.make_run_dir(a, str(tmp_path), force=False)
    assert os.path.exists(os.path.join(a, "metrics.jsonl"))
    capsys.readouterr()
    demo.make_run_dir(a, str(tmp_path), force=True)
    assert "replacing it (--force)" in capsys.readouterr().out
    assert os.listdir(a) == []


def test_console_hides_launcher_chatter_but_keeps_progress_and_errors(capsysbinary):
    console = demo._Console()
    text = (b"[2026-11-23 10:41:22,312] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator\n"
            b"  0%|   | 0/40 [00:00<?, ?step/s]/x/c10d_logger.py:83: FutureWarning: deprecated.\n"
            b"  return func(*args, **kwargs)\n  2%|   | 1/40 [00:01<01:09, loss=4.37]"
            b"\rTraceback (most recent call last):\nValueError: bad\n")
    for i in range(0, len(text), 7):  # arbitrary chunk boundaries
        console.feed(text[i:i + 7])
    console.feed(b"", final=True)
    out = capsysbinary.readouterr().out
    assert b"WARNING" not in out and b"FutureWarning" not in out and b"return func" not in out
    assert b"0/40 [00:00<?, ?step/s]" in out and b"1/40" in out and b"ValueError: bad\n" in out


def test_run_config_ships_with_the_package():
    """The demo's run config is package data (clipforge/assets/demo.yaml), not a file of the checkout."""
    import clipforge
    from clipforge.train.config import TrainConfig

    path = demo.default_config()
    assert os.path.isfile(path) and not os.path.exists(os.path.join(ROOT, "configs", "demo.yaml"))
    assert os.path.dirname(path) == os.path.join(os.path.dirname(os.path.abspath(clipforge.__file__)), "assets")
    cfg = TrainConfig.load(path)
    assert cfg.deepspeed_config(2)["train_batch_size"] == cfg.batch.global_size == 64
    if importlib.util.find_spec("deepspeed") is not None:  # the ranks run this interpreter, not a PATH script's
        assert demo.launcher() == [sys.executable, "-m", "deepspeed.launcher.runner"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_short_demo_end_to_end(data_dir, tmp_path):
    """50 steps through `python -m clipforge.demo` (launcher, 2 ranks, ZeRO 2, DALI, caching, C++ loss);
    the default run is 300 steps (93% on the held-out digits), 50 steps with a shorter warm-up reach ~50%."""
    run = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    proc = subprocess.run([sys.executable, "-m", "clipforge.demo", "--data-dir", data_dir, "--output-dir", run,
                           "--max-steps", "50", "--set", "schedule.warmup_steps=10"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "data: up to date" in proc.stdout

    # the real stack was used: 2 ranks, ZeRO 2, micro-batch < contrastive batch, DALI, C++ loss
    ds = json.load(open(os.path.join(run, "deepspeed_config.json")))
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2  # 64 = 2 ranks x 16 x 2: two ranks, gradient caching
    import yaml

    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert cfg["data"]["loader"] == "dali" and cfg["loss"]["backend"] == "cpp"

    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 51))
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.3, f"the loss barely moved: {first:.3f} -> {last:.3f}"

    # DeepSpeed's CPU comm op leaves 69 MB /dev/shm buffers per rank behind; the demo removes its own
    port = open(os.path.join(run, "train.log")).readline().split("--master_port ")[1].split()[0]
    shm = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    assert not [n for n in shm if n.endswith((f"_{port}_0", f"_{port}_1"))]

    import clipforge

    model = clipforge.load(os.path.join(run, "model.safetensors"))
    assert model.config.vision.image_size == 32
    report = json.load(open(os.path.join(run, "zeroshot.json")))
    assert report["images"] == len(json.load(open(os.path.join(data_dir, "manifest.json")))["heldout_ids"])
    assert report["templates"] >= 2
    assert report["top1"] > 0.30, f"zero-shot top-1 {report['top1']:.1%} is not well above chance (10%)"
    assert f"{report['top1']:.1%}" in proc.stdout
    for png in ("loss_curve.png", "zeroshot_confusion.png"):
        with open(os.path.join(run, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    sim = np.load(os.path.join(run, "examples.npz"))["similarity"]
    assert sim.shape == (10, 10) and np.abs(sim).max() <= 1.0 + 1e-5

    # a second run into the same folder is refused and leaves the first run's files alone
    assert demo.main(["--data-dir", data_dir, "--output-dir", run]) == 1
    assert os.path.exists(os.path.join(run, "model.safetensors"))
