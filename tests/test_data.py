"""clipforge.data: DALI and PyTorch/Pillow loaders over hand-made tars full of bad samples.

The shards here are written by hand (tests/test_shards.py's factory), not by make-shards, so every
bad sample must be caught by the read-time guard; one test reads make-shards' output of the same
samples (the trusted path).
"""
import os
import warnings

import numpy as np
import pytest
import torch

from clipforge import data
from clipforge.data import order
from clipforge.model.tokenizer import EOT_ID, SOT_ID
from clipforge.data import CLIP_MEAN, CLIP_STD, DataConfig, build_eval_loader, build_train_loader, rank_slice
from test_shards import caption_of, encode, expected_color, make_raw_dataset, solid_jpeg, write_tar

pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda120) is part of the pinned stack")
BACKENDS = ["dali", "pytorch"]
SIZE = 24


def id_tokenizer(texts):
    """Test tokenizer: "sample 17" -> [17, 0, ...], so a batch's tokens name its samples."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        out[i, 0] = int(t.split()[1])
    return out


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation: (B, 3, H, W) -> 0..255."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images * std + mean) * 255


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    paths, deliver, skips = make_raw_dataset(str(folder))
    return str(folder), paths, deliver, skips


def cfg_for(raw_folder, backend, tmp, **kw):
    base = dict(path=raw_folder, batch_size=5, loader=backend, num_workers=2, cache_dir=str(tmp / "cache"))
    base.update(kw)
    return DataConfig(**base)


def run_epoch(loader):
    keys, toks, imgs = [], [], []
    for images, tokens, k in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        assert tokens.dtype == torch.int64 and tokens.shape == (len(k), 77) and len(images) == len(k)
        keys += k
        toks.append(tokens)
        imgs.append(images)
    return keys, torch.cat(toks) if toks else torch.zeros(0, 77), torch.cat(imgs) if imgs else None


@pytest.mark.parametrize("backend, token_workers",
                         [(b, 0) for b in BACKENDS] + [(b, 1) for b in BACKENDS if b == "dali"])
def test_every_valid_sample_once_across_two_ranks(raw, backend, token_workers, tmp_path):
    """token_workers (DALI): 0 = captions tokenized by a thread ahead of the images, 1 = by a process."""
    folder, _, deliver, skips = raw
    cfg = cfg_for(folder, backend, tmp_path, token_workers=token_workers)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, 0, 0, SIZE, id_tokenizer, with_keys=True)
        keys, tokens, images = run_epoch(loader)
        assert len(keys) == loader.num_samples and abs(loader.num_samples - len(deliver) / 2) <= 0.5
        # captions and images stay with their sample: token = sample id, image colour = colour of that id
        colours = pixels(images).mean(dim=(2, 3))
        for k, tok, col in zip(keys, tokens[:, 0].tolist(), colours):
            sid, kind = deliver[k]
            assert tok == sid, (k, tok)
            assert (col - torch.tensor(expected_color(sid, kind), dtype=torch.float32)).abs().max() < 6, (k, col)
        stats = loader.stats
        assert stats["skipped"] == dict(skips), stats  # every bad kind, counted by reason
        assert stats["repaired"] == {"mode_CMYK": 1, "format_PNG": 2, "mode_I;16": 1, "mode_RGBA": 1}
        assert stats["runtime"] == {} and stats["delivered"] == len(keys)
        assert loader.log_dict()["data/skipped/too_large"] == 1
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
        seen += keys
    assert sorted(seen) == sorted(deliver)


def test_dali_reads_exactly_the_planned_order(raw, tmp_path):
    """DALI follows the per-epoch index files: its images come in the Pillow path's sequence, new each epoch.

    Keys come from the plan on both paths, so the images are what is compared: the samples are solid
    colours, whose mean survives any crop.
    """
    folder = raw[0]
    orders, colours = {}, {}
    for backend in BACKENDS:
        for epoch in (0, 1):
            loader = build_train_loader(cfg_for(folder, backend, tmp_path), 1, 3, epoch, 0, SIZE, id_tokenizer,
                                        with_keys=True)
            orders[backend, epoch], _, images = run_epoch(loader)
            colours[backend, epoch] = pixels(images).mean(dim=(2, 3))
    for epoch in (0, 1):
        assert orders["dali", epoch] == orders["pytorch", epoch]
        diff = (colours["dali", epoch] - colours["pytorch", epoch]).abs().max(dim=1).values
        assert diff.max() < 6, f"epoch {epoch}: sample {int(diff.argmax())} differs by {diff.max():.1f}/255"
    assert orders["dali", 0] != orders["dali", 1] and sorted(orders["dali", 0]) != sorted(orders["dali", 1])


@pytest.mark.parametrize("backend", BACKENDS + ["synthetic"])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_mid_epoch_delivers_exactly_the_rest(raw, backend, stop_after, tmp_path):
    cfg = cfg_for(raw[0], backend, tmp_path, num_samples=37, num_workers=1)
    full = run_epoch(build_train_loader(cfg, 0, 2, 4, 0, SIZE, id_tokenizer, with_keys=True))[0]
    loader = build_train_loader(cfg, 0, 2, 4, 0, SIZE, id_tokenizer, with_keys=True)
    first = []
    for b, (_, _, keys) in enumerate(loader):
        first += keys
        if b + 1 == stop_after:
            break
    state = loader.state_dict()
    assert state["epoch"] == 4 and state["position"] == len(first) == 5 * stop_after
    resumed = build_train_loader(cfg, 0, 2, 0, 0, SIZE, id_tokenizer, with_keys=True)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)[0]
    assert first + rest == full and len(set(full)) == len(full)
    # the trainer's other entry: start_position
    again = build_train_loader(cfg, 0, 2, 4, state["position"], SIZE, id_tokenizer, with_keys=True)
    assert run_epoch(again)[0] == rest


def test_resume_refuses_a_different_world(raw, tmp_path):
    loader = build_train_loader(cfg_for(raw[0], "pytorch", tmp_path), 0, 2, 0, 0, SIZE, id_tokenizer)
    state = loader.state_dict()
    other = build_train_loader(cfg_for(raw[0], "pytorch", tmp_path), 0, 3, 0, 0, SIZE, id_tokenizer)
    with pytest.raises(data.DataError, match="world size 2"):
        other.load_state_dict(state)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_slices_partition_each_epoch(world):
    counts = [7, 0, 13, 1, 9]
    for epoch in (0, 1):
        parts = [rank_slice(counts, seed=3, epoch=epoch, rank=r, world_size=world, shuffle=True) for r in range(world)]
        pairs = [(int(s), int(i)) for sh, sm in parts for s, i in zip(sh, sm)]
        assert sorted(pairs) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
        sizes = [len(p[0]) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        for sh, _ in parts:  # a rank reads runs of whole shards: each shard appears in one run
            runs = [s for j, s in enumerate(sh) if j == 0 or sh[j - 1] != s]
            assert len(runs) == len(set(runs))


@pytest.mark.parametrize("start", [0, 1, 6, 13, 29])
def test_epoch_plan_addresses_the_rank_slice(start):
    """The O(shards) plan (segments + per-shard permutations) is the rank's slice, from any start."""
    counts = [7, 0, 13, 1, 9]
    refs = [data.ShardRef(f"s{i}", n, "memory") for i, n in enumerate(counts)]
    cat = data.Catalog(refs)
    for rank in range(2):
        kw = dict(seed=5, epoch=2, shuffle=True)
        segs = data.rank_segments(counts, rank=rank, world_size=2, **kw)
        sh, sm = rank_slice(counts, rank=rank, world_size=2, **kw)
        plan = order._EpochPlan(cat, segs, start=min(start, len(sh)), batch_size=4, n_batches=-1, **kw)
        want = list(zip(sh.tolist(), sm.tolist()))[start:]
        assert [plan.locate(i) for i in range(plan.n)] == want
        assert [(s, int(x)) for s, part in plan.runs() for x in part] == want
        capped = order._EpochPlan(cat, segs, start=min(start, 8), batch_size=4, n_batches=2, **kw)
        assert capped.n == max(0, 8 - min(start, 8))
        assert sum(len(p) for _, p in capped.runs()) == capped.n


def test_drop_last_gives_every_rank_the_same_batch_count(raw, tmp_path):
    cfg = cfg_for(raw[0], "pytorch", tmp_path, drop_last=True, batch_size=4, num_workers=0)
    counts = []
    for r in range(3):
        loader = build_train_loader(cfg, r, 3, 0, 0, SIZE, id_tokenizer, with_keys=True)
        n = sum(1 for _ in loader)
        assert n == len(loader)
        counts.append(n)
    assert len(set(counts)) == 1 and counts[0] == (loader.total_samples // 3) // 4


def test_dali_failure_falls_back_to_pillow_for_that_batch(raw, tmp_path, monkeypatch):
    """A batch DALI fails on is decoded by Pillow; the run goes on and counts it."""
    folder, _, deliver, _ = raw
    real_build = data.DaliLoader._build

    class FailingSecondRun:
        def __init__(self, pipe):
            self.pipe, self.calls = pipe, 0

        def schedule_run(self):
            self.pipe.schedule_run()

        def outputs(self):
            self.calls += 1
            out = self.pipe.outputs()  # DALI consumed the batch, as when a decode fails inside it
            if self.calls == 2:
                raise RuntimeError("Critical error in pipeline:\nError in CPU operator nvidia.dali.fn.decoders.image")
            return out

    monkeypatch.setattr(data.DaliLoader, "_build", lambda self, plan, tmp: FailingSecondRun(real_build(self, plan, tmp)))
    cfg = cfg_for(folder, "dali", tmp_path, num_workers=1)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, 0, 0, SIZE, id_tokenizer, with_keys=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            keys, tokens, images = run_epoch(loader)
        assert any("decoding it with Pillow" in str(x.message) for x in w)
        assert loader.stats["runtime"] == {"dali_failed_batches": 1, "fallback_decoded": 5}
        colours = pixels(images).mean(dim=(2, 3))
        for k, tok, col in zip(keys, tokens[:, 0].tolist(), colours):
            sid, kind = deliver[k]
            assert tok == sid and (col - torch.tensor(expected_color(sid, kind), dtype=torch.float32)).abs().max() < 6
        seen += keys
    assert sorted(seen) == sorted(deliver)


def _photo_shards(tmp_path, n, side=48):
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [(f"k{i:03d}", {"jpg": encode(_natural(rng, side + i % 7, side), quality=90),
                                                     "txt": caption_of(i)}) for i in range(n)])
    return str(folder)


def test_dali_batches_stay_valid_while_held(tmp_path):
    """DALI's batches are handed out without a copy: holding a whole epoch of them (list(loader))
    must give the same images as cloning each batch the moment it arrives."""
    cfg = DataConfig(path=_photo_shards(tmp_path, 40), batch_size=4, loader="dali", num_workers=2, prefetch=2,
                     cache_dir=str(tmp_path / "c"))
    held = [images for images, _ in build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer)]
    cloned = [images.clone() for images, _ in build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer)]
    assert len(held) == len(cloned) == 10
    assert len({im.data_ptr() for im in held}) == len(held)  # ten buffers, none reused
    for b, (h, c) in enumerate(zip(held, cloned)):
        assert torch.equal(h, c), f"batch {b} changed after it was handed out"


@pytest.mark.parametrize("n, prefetch", [(40, 2), (40, 3), (6, 3), (4, 2)])
def test_dali_runs_exactly_the_epochs_iterations(tmp_path, monkeypatch, n, prefetch):
    """No batch is decoded past the epoch's end (the teardown would wait for it): DALI is asked for
    exactly the epoch's iterations, also when the epoch is shorter than the prefetch queue."""
    real_build = data.DaliLoader._build
    pipes = []

    def build(self, plan, tmp):
        pipes.append(real_build(self, plan, tmp))
        return pipes[-1]

    monkeypatch.setattr(data.DaliLoader, "_build", build)
    cfg = DataConfig(path=_photo_shards(tmp_path, n), batch_size=4, loader="dali", num_workers=1,
                     prefetch=prefetch, cache_dir=str(tmp_path / "c"))
    loader = build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer)
    assert sum(len(images) for images, _ in loader) == n
    # DALI's own count of scheduled-but-not-yet-returned iterations (a private attribute of Pipeline).
    assert pipes[0]._batches_to_consume == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sample_that_broke_after_validation_is_replaced_and_counted(tmp_path, backend):
    """A real decode failure at run time (no injection): the batch stays full, the bad sample replaced
    by the first candidate after its batch (k8, which then comes again in its own batch). The PyTorch
    path replaces it in its worker; DALI fails the batch, carries on with the next one, and Pillow
    re-decodes that batch with the replacement."""
    folder = tmp_path / "s"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": solid_jpeg(i), "txt": caption_of(i)}) for i in range(10)])
    cfg = DataConfig(path=str(folder), batch_size=4, loader=backend, num_workers=0 if backend == "pytorch" else 1,
                     shuffle=False, cache_dir=str(tmp_path / "c"))
    loader = build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer, with_keys=True, catalog=data.build_catalog(
        str(folder), cache_dir=str(tmp_path / "c")))
    # Corrupt one image in place after validation (same size, so the catalog still points at it).
    shard = loader.catalog.shard(0)
    row = shard.table[shard.keys.index("k5")]
    with open(folder / "a.tar", "r+b") as f:
        f.seek(int(row["img_off"]) + 2)
        f.write(b"\x00" * (int(row["img_size"]) - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        keys, tokens, images = run_epoch(loader)
    want = [0, 1, 2, 3, 4, 8, 6, 7, 8, 9]
    assert keys == [f"k{i}" for i in want]
    assert tokens[:, 0].tolist() == want
    colours = pixels(images).mean(dim=(2, 3))
    for tok, col in zip(want, colours):
        assert (col - torch.tensor(expected_color(tok, "good"), dtype=torch.float32)).abs().max() < 6
    expected = {"decode_error": 1, "replaced": 1}
    if backend == "dali":  # batch 1 (k4..k7) failed in DALI; batches 0 and 2 came from DALI itself
        expected.update(dali_failed_batches=1, fallback_decoded=4)
    assert loader.stats["runtime"] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_keys_with_reencoded_members_stay_paired(tmp_path, backend):
    """A foreign shard repeating sample keys, with PNG members (re-encoded into the repair tar): every
    delivered image is its own caption's, checked by content; the first sample of a key is kept and
    the others counted (once apart, once back to back: `c.png c.txt c.png c.txt` is two samples)."""
    from PIL import Image

    from test_shards import color_of

    def png(i):
        return encode(Image.new("RGB", (20, 20), color_of(i)), "PNG")

    folder = tmp_path / "dup"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [
        ("a", {"png": png(1), "txt": caption_of(1)}), ("b", {"png": png(2), "txt": caption_of(2)}),
        ("a", {"png": png(3), "txt": caption_of(3)}), ("c", {"png": png(4), "txt": caption_of(4)}),
        ("c", {"png": png(5), "txt": caption_of(5)}), ("d", {"jpg": solid_jpeg(6), "txt": caption_of(6)}),
    ])
    cfg = DataConfig(path=str(folder), batch_size=2, loader=backend, num_workers=1, cache_dir=str(tmp_path / "c"))
    loader = build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer, with_keys=True)
    keys, tokens, images = run_epoch(loader)
    assert dict(zip(keys, tokens[:, 0].tolist())) == {"a": 1, "b": 2, "c": 4, "d": 6}
    colours = pixels(images).mean(dim=(2, 3))
    for k, tok, col in zip(keys, tokens[:, 0].tolist(), colours):
        assert (col - torch.tensor(color_of(tok), dtype=torch.float32)).abs().max() < 6, (k, tok, col)
    assert loader.stats["skipped"] == {"duplicate_key": 2}
    assert loader.stats["repaired"] == {"format_PNG": 3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_member_names_with_spaces_unicode_and_dots(tmp_path, backend):
    """Any name a tar member can have (a space once made DALI refuse the whole epoch's index,
    "Malformed index file", before step 1): every sample trained on, paired by content."""
    from test_shards import color_of

    names = ["my photo", "dir.v2/caf\u00e9 \u732b", "x\u3000y", "tab\there", "plain"]
    folder = tmp_path / "names"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [(n, {"jpg": solid_jpeg(i), "txt": caption_of(i)}) for i, n in enumerate(names)])
    cfg = DataConfig(path=str(folder), batch_size=2, loader=backend, num_workers=1, cache_dir=str(tmp_path / "c"))
    keys, tokens, images = run_epoch(build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer, with_keys=True))
    assert sorted(keys) == sorted(names)
    colours = pixels(images).mean(dim=(2, 3))
    for k, tok, col in zip(keys, tokens[:, 0].tolist(), colours):
        assert names.index(k) == tok and (col - torch.tensor(color_of(tok), dtype=torch.float32)).abs().max() < 6


def _corrupted_after_validation(tmp_path, backend, bad, n=10, **kw):
    """A loader over one tar of n solid JPEGs whose samples `bad` are zeroed in place after the catalog
    was built (same sizes: the catalog still points at them, only decoding can tell)."""
    folder = tmp_path / "s"
    folder.mkdir(exist_ok=True)
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": solid_jpeg(i), "txt": caption_of(i)}) for i in range(n)])
    catalog = data.build_catalog(str(folder), cache_dir=str(tmp_path / "c"))
    shard = catalog.shard(0)
    with open(folder / "a.tar", "r+b") as f:
        for k in bad:
            row = shard.table[shard.keys.index(f"k{k}")]
            f.seek(int(row["img_off"]) + 2)
            f.write(b"\x00" * (int(row["img_size"]) - 2))
    cfg = DataConfig(path=str(folder), batch_size=4, loader=backend, num_workers=0 if backend == "pytorch" else 1,
                     cache_dir=str(tmp_path / "c"), **kw)
    return lambda start=0: build_train_loader(cfg, 0, 1, 3, start, SIZE, id_tokenizer, with_keys=True,
                                              catalog=catalog)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replacements_resume_exactly(tmp_path, backend):
    make = _corrupted_after_validation(tmp_path, backend, bad=[2, 7], n=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = run_epoch(make())[0]
        loader = make()
        first = next(iter(loader))[2]
        rest = run_epoch(make(loader.state_dict()["position"]))[0]
    assert len(full) == 12 and first + rest == full and "k2" not in full and "k7" not in full


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_with_nothing_usable_stops_with_one_sentence(tmp_path, backend):
    make = _corrupted_after_validation(tmp_path, backend, bad=range(6), n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(data.DataError, match=r"no sample of epoch 3 can replace a bad one: all 6 were tried"):
            run_epoch(make())


def test_make_shards_output_is_trusted_and_read_by_both(raw, tmp_path):
    """make-shards over the raw samples: the loader reads its index without re-validating."""
    from clipforge.data import make_shards as shards

    folder, paths, deliver, skips = raw
    src = tmp_path / "src"
    src.mkdir()
    import tarfile

    for p in paths:  # unpack the hand-made tars into a folder source
        with tarfile.open(p) as tar:
            for m in tar:
                (src / m.name.replace("/", "_")).write_bytes(tar.extractfile(m).read())
    out = str(tmp_path / "shards")
    stats = shards.make_shards(shards.MakeShardsConfig(str(src), out, shard_size=8, workers=1, progress=False))
    assert stats["count"] == len(deliver) and stats["skipped"] == dict(skips)
    for backend in BACKENDS:
        cache = tmp_path / f"cache-{backend}"
        loader = build_train_loader(cfg_for(out, backend, tmp_path, cache_dir=str(cache)), 0, 1, 0, 0, SIZE,
                                    id_tokenizer, with_keys=True)
        keys, tokens, _ = run_epoch(loader)
        assert len(keys) == len(deliver) == len(set(keys))
        assert sorted(tokens[:, 0].tolist()) == sorted(sid for sid, _ in deliver.values())
        # trusted shards are never re-validated: the cache holds only their hash checks
        assert sorted(os.listdir(cache)) == ["verified"] and len(os.listdir(cache / "verified")) == len(stats["shards"])
        assert loader.stats["skipped"] == {} and loader.stats["skipped_at_make_shards"] == dict(skips)
    # an index rewritten after make-shards (same sample count, other offsets) loses the trust too
    idx_path = os.path.join(out, "00001.idx")
    lines = open(idx_path).read().splitlines()
    open(idx_path, "w").write("\n".join([lines[0]] + lines[:0:-1]) + "\n")  # the samples listed in reverse
    fresh = build_train_loader(cfg_for(out, "pytorch", tmp_path, cache_dir=str(tmp_path / "c3")), 0, 1, 0, 0, SIZE,
                               id_tokenizer)
    assert fresh.catalog.refs[1].source != "index" and fresh.catalog.refs[0].source == "index"
    # a trusted shard whose .idx vanishes during the run is skipped like a vanished shard (warned,
    # counted, its samples replaced), not a crash
    running = build_train_loader(cfg_for(out, "pytorch", tmp_path, cache_dir=str(cache)), 0, 1, 0, 0, SIZE,
                                 id_tokenizer, with_keys=True)
    os.remove(os.path.join(out, "00002.idx"))
    with pytest.warns(RuntimeWarning, match="00002.tar is gone from disk"):
        n = sum(len(k) for _, _, k in running)
    assert n == len(deliver) and running.stats["runtime"]["vanished_shards"] == 1
    # a shard modified after make-shards loses that trust and goes through the read-time guard
    with open(os.path.join(out, "00000.tar"), "ab") as f:
        f.write(b"\0" * 1024)
    loader = build_train_loader(cfg_for(out, "pytorch", tmp_path, cache_dir=str(tmp_path / "c2")), 0, 1, 0, 0, SIZE,
                                id_tokenizer)
    assert loader.catalog.refs[0].count == len(loader.catalog.shard(0)) == 8 and (tmp_path / "c2").exists()


def test_a_forged_stats_json_switches_no_validation_off(tmp_path):
    """A stats.json dropped beside foreign shards, claiming them validated (with their true sizes, and a
    made-up or another shard's SHA-256): the loader validates anyway, so the decompression-bomb PNG
    (60,000 x 60,000 pixels in ~40 KB) and the truncated JPEG are skipped and counted."""
    import json
    import zlib

    from clipforge.data import webdataset

    def png_bomb(side=60_000):  # a valid header, an IDAT of deflated zeros: the decode would need 10 GB
        import struct

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        raw = zlib.compress(b"\0" * (side + 1) * 64, 9)  # first rows only: Pillow reads the header first
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", raw) + chunk(b"IEND", b""))

    folder = tmp_path / "foreign"
    folder.mkdir()
    good = [(f"k{i}", {"jpg": solid_jpeg(i), "txt": caption_of(i)}) for i in range(4)]
    bad = [("bomb", {"png": png_bomb(), "txt": caption_of(90)}),
           ("cut", {"jpg": solid_jpeg(91)[:200], "txt": caption_of(91)})]
    write_tar(str(folder / "00000.tar"), good[:2] + bad + good[2:])
    webdataset.index_tar(str(folder / "00000.tar"))
    size = os.path.getsize(folder / "00000.tar")
    idx_sha = webdataset.sha256_file(str(folder / "00000.idx"))
    for sha in ("0" * 64, webdataset.sha256_file(solid_jpeg.__code__.co_filename)):
        (folder / "stats.json").write_text(json.dumps({
            "format": webdataset.STATS_FORMAT, "validated": True, "count": 6,
            "shards": [{"name": "00000.tar", "count": 6, "bytes": size, "sha256": sha, "idx_sha256": idx_sha}]}))
        cache = tmp_path / f"cache-{sha[:4]}"
        loader = build_train_loader(DataConfig(path=str(folder), batch_size=2, loader="pytorch", num_workers=0,
                                               cache_dir=str(cache)), 0, 1, 0, 0, SIZE, id_tokenizer, with_keys=True)
        keys = run_epoch(loader)[0]
        assert sorted(keys) == ["k0", "k1", "k2", "k3"]
        assert loader.stats["skipped"] == {"too_large": 1, "corrupt_image": 1}


def test_a_truncated_tar_is_counted_and_warned_about(tmp_path):
    import tarfile

    folder = tmp_path / "cut"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": solid_jpeg(i), "txt": caption_of(i)}) for i in range(8)])
    with tarfile.open(folder / "a.tar") as tar:
        k5 = tar.getmember("k5.jpg")
    data_bytes = (folder / "a.tar").read_bytes()
    (folder / "a.tar").write_bytes(data_bytes[: k5.offset_data + 100])  # a download cut inside k5.jpg
    cfg = DataConfig(path=str(folder), batch_size=2, loader="pytorch", num_workers=0, cache_dir=str(tmp_path / "c"))
    with pytest.warns(RuntimeWarning, match=r"a.tar is cut short or damaged after byte"):
        loader = build_train_loader(cfg, 0, 1, 0, 0, SIZE, id_tokenizer, with_keys=True)
    assert sorted(run_epoch(loader)[0]) == [f"k{i}" for i in range(5)]
    assert loader.stats["skipped"] == {"truncated_tar": 1}


def test_real_tokenizer_receives_the_captions(tmp_path):
    import clipforge

    folder = tmp_path / "s"
    folder.mkdir()
    caps = ["a photo of a cat", "Ünïcödé  caption\twith spaces", "x" * 400]
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": solid_jpeg(i), "txt": c.encode()}) for i, c in enumerate(caps)])
    cfg = DataConfig(path=str(folder), batch_size=8, loader="dali", num_workers=1, shuffle=False,
                     cache_dir=str(tmp_path / "c"))
    (_, tokens), = list(build_train_loader(cfg, 0, 1, 0, 0, SIZE))  # default tokenizer: clipforge.tokenize
    assert torch.equal(tokens, clipforge.tokenize(caps))


def _natural(rng, w, h):
    """Smooth colour waves plus blurred noise: JPEG-compressible like a photo, with real detail."""
    from PIL import Image, ImageFilter

    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([128 + 90 * np.sin(7 * x + c) * np.cos(5 * y - c) for c in range(3)], -1)
    noise = np.kron(rng.normal(0, 20, (h // 4 + 1, w // 4 + 1, 3)), np.ones((4, 4, 1)))[:h, :w]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def test_dali_and_pillow_decode_alike(tmp_path):
    """Same resize + centre crop: DALI's and Pillow's images differ by < 2/255 on average, per image."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (97, 61), (61, 97), (301, 199), (250, 333), (1, 1), (3, 500), (56, 56)]
    folder = tmp_path / "s"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": encode(_natural(rng, *s), quality=90), "txt": caption_of(i)})
                                      for i, s in enumerate(sizes)])
    out = {}
    for backend in BACKENDS:
        cfg = DataConfig(path=str(folder), batch_size=3, loader=backend, num_workers=1, cache_dir=str(tmp_path / "c"))
        for images, _, keys in build_eval_loader(cfg, 0, 1, 56, id_tokenizer, with_keys=True):
            for k, im in zip(keys, pixels(images)):
                out.setdefault(k, {})[backend] = im
    assert len(out) == len(sizes)
    for k, v in out.items():
        mad = (v["dali"] - v["pytorch"]).abs().mean().item()
        assert mad < 2.0, f"{k} {sizes[int(k[1:])]}: mean |DALI - Pillow| = {mad:.3f}/255"


def test_interpolation_and_statistics_reach_both_loaders(tmp_path):
    """data.mean / data.std normalise, data.interpolation resizes, in DALI's pipeline and Pillow's alike."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "s"
    folder.mkdir()
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": encode(_natural(rng, 97 + 13 * i, 61), quality=90),
                                                 "txt": caption_of(i)}) for i in range(4)])
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)

    def levels(backend, **kw):
        cfg = DataConfig(path=str(folder), batch_size=4, loader=backend, num_workers=1, cache_dir=str(tmp_path / "c"),
                         **kw)
        (images, _), = list(build_eval_loader(cfg, 0, 1, 40, id_tokenizer))
        m, s = torch.tensor(kw.get("mean", CLIP_MEAN)).view(1, 3, 1, 1), torch.tensor(kw.get("std", CLIP_STD)).view(1, 3, 1, 1)
        return (images * s + m) * 255

    for backend in BACKENDS:
        default = levels(backend)
        torch.testing.assert_close(levels(backend, mean=mean, std=std), default, atol=1e-3, rtol=0)
        bilinear = levels(backend, interpolation="bilinear")
        assert (bilinear - default).abs().mean() > 0.05, backend  # the resize filter changed
        assert (bilinear - levels("pytorch" if backend == "dali" else "dali", interpolation="bilinear")).abs().mean() < 2.0


@pytest.mark.cuda
def test_dali_gpu_decode_matches_pillow(tmp_path):
    """device="mixed" (nvJPEG) against Pillow on the CPU, same eval geometry: < 2/255 on average."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "s"
    folder.mkdir()
    sizes = [(97, 61), (256, 256), (301, 199)]
    write_tar(str(folder / "a.tar"), [(f"k{i}", {"jpg": encode(_natural(rng, *s), quality=90), "txt": caption_of(i)})
                                      for i, s in enumerate(sizes)])
    out = {}
    for backend, device in (("dali", "cuda"), ("pytorch", "cpu")):
        cfg = DataConfig(path=str(folder), batch_size=2, loader=backend, num_workers=1, device=device,
                         cache_dir=str(tmp_path / "c"))
        for images, _, keys in build_eval_loader(cfg, 0, 1, 64, id_tokenizer, with_keys=True):
            assert images.device.type == device
            for k, im in zip(keys, pixels(images.cpu())):
                out.setdefault(k, {})[backend] = im
    for k, v in out.items():
        assert (v["dali"] - v["pytorch"]).abs().mean().item() < 2.0, k


def test_synthetic_loader_shapes_and_learnable_pairs():
    cfg = DataConfig(loader="synthetic", batch_size=6, num_samples=20, num_classes=4)
    seen = []
    for r in range(2):
        loader = build_train_loader(cfg, r, 2, 0, 0, 16, tokenizer=id_tokenizer, with_keys=True)
        assert len(loader) == 2
        for images, tokens, keys in loader:
            assert images.shape == (len(keys), 3, 16, 16) and images.dtype == torch.float32
            assert tokens[:, 0].eq(SOT_ID).all() and tokens[:, 2].eq(EOT_ID).all()
            cls = torch.tensor([int(k[9:]) % 4 for k in keys])
            assert torch.equal(tokens[:, 1], 1000 + cls)
            seen += keys
    assert sorted(seen) == [f"synthetic{i:08d}" for i in range(20)]


def test_config_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        build_train_loader(DataConfig(path=str(tmp_path / "none.tar"), loader="pytorch"), tokenizer=id_tokenizer)
    with pytest.raises(data.DataError, match="data.loader"):
        build_train_loader(DataConfig(loader="magic"), tokenizer=id_tokenizer)
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(data.DataError, match="not a readable tar"):
        build_train_loader(DataConfig(path=str(tmp_path / "bad.tar"), loader="pytorch",
                                      cache_dir=str(tmp_path / "c")), tokenizer=id_tokenizer)
    assert data.DataConfig.from_dict({"batch_size": 3}).batch_size == 3
    with pytest.raises(ValueError, match="data.batchsize"):
        data.DataConfig.from_dict({"batchsize": 3})


def test_caption_thread_keeps_order_and_surfaces_errors_at_their_item():
    from clipforge.data.dali import _ThreadAhead

    class Items:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise ValueError("caption 4 is broken")
            return i * 10

    it = _ThreadAhead(Items(), depth=3)
    assert [next(it) for _ in range(4)] == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="caption 4"):
        next(it)
    assert next(it) == 50
    with pytest.raises(StopIteration):
        next(it)
