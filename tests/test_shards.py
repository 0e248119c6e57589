"""make-shards, the DALI index writer and the sample checks (clipforge.shards).

The bad-sample factory below is shared with tests/test_data.py: every kind of bad sample the data
issue lists, each with exactly one defect, so the expected skip counts are known.
"""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipforge.data import make_shards as shards
from clipforge.data import validate
from clipforge.data import webdataset
from clipforge.data.validate import check_caption, check_image, jpeg_structure_error


# ---------------------------------------------------------------------------------------------
# Sample factory
# ---------------------------------------------------------------------------------------------

def encode(im, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def color_of(i: int) -> tuple[int, int, int]:
    """A distinct, mid-range colour per sample id (mid-range: CMYK and JPEG round trips stay close)."""
    return 40 + (i * 37) % 170, 40 + (i * 71) % 170, 40 + (i * 113) % 170


def solid_jpeg(i: int, size=(45, 37), mode="RGB", **kw) -> bytes:
    return encode(Image.new("RGB", size, color_of(i)).convert(mode), **kw)


def big_jpeg(width: int, height: int, color=(10, 200, 30)) -> bytes:
    """A valid width x height baseline JPEG in ~0.1 s (encoding 144 MP directly takes seconds).

    One 16-pixel MCU row is encoded with a restart marker after every row; rows are then byte-aligned
    and independent of DC prediction, so height/16 copies of the first row, separated by RSTn
    markers, with the frame height patched, make a valid image every decoder accepts.
    """
    d = encode(Image.new("RGB", (width, 32), color), quality=75, restart_marker_rows=1, subsampling=2)
    sos = d.index(b"\xff\xda")
    scan = sos + 2 + ((d[sos + 2] << 8) | d[sos + 3])
    row = d[scan:d.index(b"\xff\xd0", scan)]
    head = bytearray(d[:scan])
    sof = d.index(b"\xff\xc0")
    head[sof + 5:sof + 7] = height.to_bytes(2, "big")
    rows = height // 16
    parts = [bytes(head)]
    for r in range(rows):
        parts.append(row)
        if r < rows - 1:
            parts.append(bytes([0xFF, 0xD0 + r % 8]))
    parts.append(b"\xff\xd9")
    return b"".join(parts)


def png16(i: int, size=(23, 19)) -> bytes:
    v = color_of(i)[0] * 257  # the 16-bit value whose top byte is the 8-bit grey
    return encode(Image.fromarray(np.full((size[1], size[0]), v, dtype=np.uint16)), "PNG")


def rgba_png(i: int, size=(31, 17)) -> bytes:
    return encode(Image.new("RGBA", size, color_of(i) + (255,)), "PNG")


def caption_of(i: int) -> bytes:
    return f"sample {i}".encode()


def bad_samples(base: int):
    """(name, {ext: bytes}, skip reason or None) for every kind of bad sample; sample k has id base + k."""
    good = solid_jpeg(999)
    header_zeroed = good[:300] + bytes(100) + good[400:]
    out = [
        # skipped
        ("truncated", {"jpg": good[: len(good) // 2], "txt": caption_of(base)}, "corrupt_image"),
        ("garbage", {"jpg": b"definitely not an image" * 5, "txt": caption_of(base + 1)}, "corrupt_image"),
        ("header_zeroed", {"jpg": header_zeroed, "txt": caption_of(base + 2)}, "corrupt_image"),
        ("zero_bytes", {"jpg": b"", "txt": caption_of(base + 3)}, "empty_image"),
        ("no_caption", {"jpg": solid_jpeg(base + 4)}, "missing_caption"),
        ("blank_caption", {"jpg": solid_jpeg(base + 5), "txt": b"  \n\t "}, "empty_caption"),
        ("latin1_caption", {"jpg": solid_jpeg(base + 6), "txt": "caf\xe9 cr\xe8me".encode("latin-1")},
         "bad_caption_encoding"),
        ("no_image", {"txt": caption_of(base + 7)}, "missing_image"),
        ("huge", {"jpg": big_jpeg(12000, 12000), "txt": caption_of(base + 8)}, "too_large"),
        # delivered
        ("cmyk", {"jpg": solid_jpeg(base + 9, mode="CMYK"), "txt": caption_of(base + 9)}, None),
        ("gray", {"jpg": encode(Image.new("L", (29, 41), color_of(base + 10)[0])), "txt": caption_of(base + 10)}, None),
        ("png16", {"png": png16(base + 11), "txt": caption_of(base + 11)}, None),
        ("alpha", {"png": rgba_png(base + 12), "txt": caption_of(base + 12)}, None),
        ("one_pixel", {"jpg": solid_jpeg(base + 13, size=(1, 1)), "txt": caption_of(base + 13)}, None),
        ("jpeg_ext", {"jpeg": solid_jpeg(base + 14), "txt": caption_of(base + 14)}, None),
    ]
    return out


def expected_color(i: int, kind: str) -> tuple[int, int, int]:
    if kind in ("gray", "png16"):
        v = color_of(i)[0]
        return v, v, v
    return color_of(i)


def write_tar(path, samples) -> None:
    """A hand-made webdataset tar (NOT make-shards): samples = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as tar:
        for key, comps in samples:
            for ext, data in comps.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_raw_dataset(folder, n_good=(23, 17, 9)):
    """Hand-made tars with good samples and one of every bad kind.

    Returns (tar paths, {key: (id, kind)} of the deliverable samples, Counter of expected skips).
    """
    from collections import Counter

    os.makedirs(folder, exist_ok=True)
    deliver, skips, paths, next_id = {}, Counter(), [], 0
    bad = bad_samples(1000)
    for t, n in enumerate(n_good):
        samples = []
        for j in range(n):
            key = f"t{t}/good{next_id:04d}"
            samples.append((key, {"jpg": solid_jpeg(next_id), "txt": caption_of(next_id)}))
            deliver[key] = (next_id, "good")
            next_id += 1
        if t == 0:  # all bad kinds in the first tar, interleaved with good ones
            for k, (name, comps, reason) in enumerate(bad):
                key = f"t{t}/{name}"
                samples.insert(2 * k + 1, (key, comps))
                if reason:
                    skips[reason] += 1
                else:
                    deliver[key] = (1000 + k, name)
        path = os.path.join(folder, f"raw-{t}.tar")
        write_tar(path, samples)
        paths.append(path)
    return paths, deliver, skips


# ---------------------------------------------------------------------------------------------
# Captions and images
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, text, reason", [
    (b"a cat", "a cat", None),
    ("\ufeffun caf\xe9 \u732b\n".encode("utf-8"), "un caf\xe9 \u732b", None),
    (None, None, "missing_caption"),
    (b"", None, "empty_caption"),
    (b" \n\t", None, "empty_caption"),
    (b"\xff\xfe\xfa", None, "bad_caption_encoding"),
    ("caf\xe9".encode("latin-1"), None, "bad_caption_encoding"),
])
def test_check_caption(raw, text, reason):
    assert check_caption(raw) == (text, reason)


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("size", [(1, 1), (45, 37), (17, 300)])
def test_good_jpeg_kept_byte_for_byte(size):
    data = solid_jpeg(3, size=size)
    chk = check_image(data)
    assert chk.reason is None and chk.repaired is None and chk.data is data
    assert (chk.width, chk.height) == size


def test_progressive_and_restart_jpegs_pass_the_structure_walk():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (67, 91, 3), dtype=np.uint8))
    for kw in ({"progressive": True}, {"restart_marker_blocks": 3}, {"optimize": True}, {}):
        data = encode(im, **kw)
        assert jpeg_structure_error(data) is None, kw
        assert check_image(data).reason is None


@pytest.mark.parametrize("name", ["truncated", "garbage", "header_zeroed", "zero_bytes"])
def test_broken_images_skipped(name):
    comps, reason = next((c, r) for n, c, r in bad_samples(0) if n == name)
    assert check_image(comps["jpg"]).reason == reason


def test_bad_marker_inside_scan_is_caught():
    data = bytearray(solid_jpeg(1, size=(64, 64)))
    sos = data.index(b"\xff\xda")
    data[sos + 20: sos + 22] = b"\xff\x02"  # a reserved marker inside entropy-coded data
    assert "invalid marker" in jpeg_structure_error(bytes(data))
    assert check_image(bytes(data)).reason == "corrupt_image"


def test_missing_image():
    assert check_image(None).reason == "missing_image"


@pytest.mark.parametrize("kind", ["cmyk", "png16", "alpha", "gray"])
def test_odd_modes_become_rgb_jpeg(kind):
    i = 5
    data = {"cmyk": solid_jpeg(i, mode="CMYK"), "png16": png16(i), "alpha": rgba_png(i),
            "gray": encode(Image.new("L", (29, 41), color_of(i)[0]))}[kind]
    chk = check_image(data)
    assert chk.reason is None
    out = Image.open(io.BytesIO(chk.data))
    assert out.format == "JPEG" and out.mode in (("L",) if kind == "gray" else ("RGB",))
    if kind == "gray":
        assert chk.repaired is None  # grayscale JPEGs decode to RGB everywhere: kept as they are
    else:
        assert chk.repaired
    got = _decoded(chk.data).reshape(-1, 3).mean(0)
    want = np.array(expected_color(i, kind))
    assert np.abs(got - want).max() <= 4, (got, want)


def test_alpha_composited_over_white_and_16bit_scaled():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert _decoded(check_image(encode(im, "PNG")).data).min() >= 250
    v = np.full((4, 6), 40000, dtype=np.uint16)  # 40000 >> 8 = 156, where a clip would give 255
    got = _decoded(check_image(encode(Image.fromarray(v), "PNG")).data)
    assert np.abs(got - 156).max() <= 2


def test_exif_rotation_applied():
    im = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    chk = check_image(encode(im, exif=exif.tobytes()))
    assert chk.repaired == "exif_orientation" and (chk.width, chk.height) == (20, 40)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_image_skipped_or_shrunk():
    data = big_jpeg(12000, 12000)
    assert Image.open(io.BytesIO(data)).size == (12000, 12000)
    assert check_image(data).reason == "too_large"
    chk = check_image(data, max_side=512)
    assert chk.reason is None and chk.repaired == "resized" and (chk.width, chk.height) == (512, 512)
    assert (chk.original_width, chk.original_height) == (12000, 12000)
    assert np.abs(_decoded(chk.data).reshape(-1, 3).mean(0) - (10, 200, 30)).max() <= 3


# ---------------------------------------------------------------------------------------------
# DALI index files
# ---------------------------------------------------------------------------------------------

def test_index_matches_dalis_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # ships with nvidia-dali
    path = str(tmp_path / "a.tar")
    write_tar(path, [("dir/k.0", {"jpg": solid_jpeg(0), "txt": b"x", "json": b"{}"}),
                     ("k1", {"txt": b"y" * 513}), ("k2", {"jpg": solid_jpeg(2, size=(3, 700))})])
    ours = webdataset.index_tar(path, str(tmp_path / "ours.idx"))
    with wds2idx.IndexCreator(path, str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert open(ours).read() == open(tmp_path / "ref.idx").read()
    parsed = webdataset.read_index(ours)
    assert [c[0][3] for c in parsed] == ["dir/k.0.jpg", "k1.txt", "k2.jpg"]
    with open(path, "rb") as f:  # offsets point at the members' data
        ext, off, size, name = parsed[2][0]
        f.seek(off)
        assert f.read(size) == solid_jpeg(2, size=(3, 700))


def test_read_index_rejects_wrong_count(tmp_path):
    p = tmp_path / "x.idx"
    p.write_text("v1.2 3\njpg 512 10 a.jpg\n")
    with pytest.raises(ValueError, match="announces 3 samples"):
        webdataset.read_index(str(p))


# ---------------------------------------------------------------------------------------------
# make-shards
# ---------------------------------------------------------------------------------------------

def _source_folder(folder):
    """Folder source: 7 good pairs (one in a sub-folder, one PNG) plus every bad kind."""
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    good = {}
    for i in range(7):
        name = os.path.join(folder, "sub" if i == 3 else "", f"img{i}")
        ext = "png" if i == 5 else "jpg"
        with open(f"{name}.{ext}", "wb") as f:
            f.write(encode(Image.new("RGB", (30 + i, 20), color_of(i)), "PNG") if ext == "png" else solid_jpeg(i))
        with open(f"{name}.txt", "wb") as f:
            f.write(caption_of(i))
        good[f"sample {i}"] = i
    expected = {}
    for name, comps, reason in bad_samples(100):
        for ext, data in comps.items():
            with open(os.path.join(folder, f"bad_{name}.{ext}"), "wb") as f:
                f.write(data)
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
        else:
            good[comps["txt"].decode()] = None
    return good, expected


def _read_shard(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = webdataset.split_name(m.name)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_make_shards_folder(tmp_path):
    good, expected_skips = _source_folder(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    from clipforge import cli

    assert cli.main(["make-shards", str(tmp_path / "src"), out, "--shard-size", "5", "--workers", "2", "--quiet"]) == 0
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["validated"] and stats["format"] == webdataset.STATS_FORMAT
    assert stats["count"] == len(good) and stats["skipped"] == expected_skips
    assert stats["seen"] == len(good) + sum(expected_skips.values())
    assert {s["reason"] for s in stats["skipped_samples"]} == set(expected_skips)
    assert stats["repaired"]["mode_CMYK"] == 1 and stats["repaired"]["format_PNG"] == 3  # png16, alpha, img5
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert names == [f"{i:05d}.tar" for i in range(len(names))] and len(names) == -(-len(good) // 5)
    captions = set()
    for s in stats["shards"]:
        tar_path = os.path.join(out, s["name"])
        assert s["bytes"] == os.path.getsize(tar_path)
        members = _read_shard(tar_path)
        assert len(members) == s["count"] <= 5
        for key, comps in members.items():
            assert set(comps) == {"jpg", "txt", "json"} and len(key) == 5 + 1
            meta = json.loads(comps["json"])
            im = Image.open(io.BytesIO(comps["jpg"]))
            assert im.format == "JPEG" and im.mode in ("RGB", "L") and meta["key"] == key
            assert (meta["width"], meta["height"]) == im.size and meta["caption"] == comps["txt"].decode()
            captions.add(comps["txt"].decode())
        # the index make-shards wrote is the index of the tar it wrote
        idx = webdataset.read_index(tar_path[:-4] + ".idx")
        assert [[c[:3] for c in comps] for comps in idx] == [
            [(e, *v[:2]) for e, v in comps.items()] for _, comps in webdataset.scan_tar(tar_path)]
    assert captions == set(good)


def test_make_shards_csv_and_parquet(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(solid_jpeg(i, size=(600, 300)))
        rows.append({"filepath": f"imgs/{i}.jpg", "caption": f"sample {i}"})
    rows.append({"filepath": "imgs/missing.jpg", "caption": "sample 9"})
    rows.append({"filepath": "imgs/0.jpg", "caption": ""})
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["filepath", "caption"])
        w.writeheader()
        w.writerows(rows)
    stats = shards.make_shards(shards.MakeShardsConfig(str(tmp_path / "list.csv"), str(tmp_path / "a"), shard_size=3,
                                                       max_side=64, workers=1, progress=False))
    assert stats["count"] == 4 and stats["skipped"] == {"missing_image": 1, "empty_caption": 1}
    assert stats["repaired"] == {"resized": 4}
    first = _read_shard(str(tmp_path / "a" / "00000.tar"))
    assert max(Image.open(io.BytesIO(first["000000"]["jpg"])).size) == 64

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [r["filepath"] for r in rows], "text": [r["caption"] for r in rows]}),
                   tmp_path / "list.parquet")
    stats = shards.make_shards(shards.MakeShardsConfig(str(tmp_path / "list.parquet"), str(tmp_path / "b"),
                                                       workers=1, progress=False))
    assert stats["count"] == 4 and stats["skipped"] == {"missing_image": 1, "empty_caption": 1}


def test_make_shards_errors(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"")
    assert shards.main([str(tmp_path), str(tmp_path / "out"), "--quiet"]) == 2  # output not empty
    assert shards.main([str(tmp_path / "nope"), str(tmp_path / "o2"), "--quiet"]) == 2
    (tmp_path / "t.csv").write_text("a,b\nx,y\n")
    with pytest.raises(ValueError, match="--image-col"):
        shards.make_shards(shards.MakeShardsConfig(str(tmp_path / "t.csv"), str(tmp_path / "o3"), progress=False))


def test_make_shards_that_writes_nothing_exits_1_saying_why(tmp_path, capsys):
    """A folder of images without captions wrote zero shards and exited 0: now 1, with one sentence."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"im{i}.jpg").write_bytes(solid_jpeg(i))
    out = tmp_path / "out"
    assert shards.main([str(src), str(out), "--quiet", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("clipforge make-shards: no shard written: 3 images found in")
    assert "none with a caption (a same-name .txt beside each image" in err
    assert os.listdir(out) == ["stats.json"]  # no empty shard or index, no temp file
    assert json.load(open(out / "stats.json"))["skipped"] == {"missing_caption": 3}
    # every sample skipped for other reasons: the counts, and where the list is
    (src / "im0.txt").write_bytes(b"")
    (src / "im1.txt").write_bytes(caption_of(1))
    (src / "im1.jpg").write_bytes(b"not a jpeg")
    assert shards.main([str(src), str(tmp_path / "o2"), "--quiet", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "all 3 samples of" in err and "(corrupt_image 1, empty_caption 1, missing_caption 1)" in err
    assert "stats.json lists them" in err and os.listdir(tmp_path / "o2") == ["stats.json"]
    # nothing to read at all; the same OUT can be reused once there is something to write
    (tmp_path / "empty").mkdir()
    assert shards.main([str(tmp_path / "empty"), str(out), "--quiet"]) == 1
    assert "holds no images (.jpg" in capsys.readouterr().err
    (src / "im2.txt").write_bytes(caption_of(2))
    assert shards.main([str(src), str(out), "--quiet", "--workers", "1"]) == 0
    assert sorted(os.listdir(out)) == ["00000.idx", "00000.tar", "stats.json"]
    assert shards.main([str(tmp_path / "nope"), str(tmp_path / "o3"), "--quiet"]) == 2  # usage: still 2


def test_make_shards_refuses_pipes_devices_links_out_and_duplicate_stems(tmp_path):
    """A named pipe and a link to /dev/zero hung make-shards (or read forever); a link or a table path
    leading out of the source folder was followed; a second image of one stem vanished uncounted."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    for i in range(3):
        (src / f"ok{i}.jpg").write_bytes(solid_jpeg(i))
        (src / f"ok{i}.txt").write_bytes(caption_of(i))
    os.mkfifo(src / "pipe.jpg")
    (src / "pipe.txt").write_bytes(caption_of(10))
    os.symlink("/dev/zero", src / "zero.jpg")
    (src / "zero.txt").write_bytes(caption_of(11))
    (outside / "secret.jpg").write_bytes(solid_jpeg(12))
    os.symlink(outside / "secret.jpg", src / "away.jpg")
    (src / "away.txt").write_bytes(caption_of(12))
    os.mkfifo(src / "fifo_caption.txt")  # a caption that is a pipe
    (src / "fifo_caption.jpg").write_bytes(solid_jpeg(13))
    (src / "ok0.png").write_bytes(encode(Image.new("RGB", (9, 9), color_of(14)), "PNG"))  # a second ok0
    (src / "inside_link.jpg").symlink_to(src / "ok1.jpg")  # a link that stays inside is fine
    (src / "inside_link.txt").write_bytes(caption_of(15))
    # worker processes too: the refused paths (and their reasons) travel to them pickled
    two = shards.make_shards(shards.MakeShardsConfig(str(src), str(tmp_path / "out2"), workers=2, progress=False))
    out = tmp_path / "out"
    stats = shards.make_shards(shards.MakeShardsConfig(str(src), str(out), workers=1, progress=False))
    assert two["skipped"] == stats["skipped"] and two["count"] == stats["count"]
    assert stats["count"] == 4  # ok0 (the .jpg: first in sorted order), ok1, ok2, inside_link
    assert stats["skipped"] == {"not_a_regular_file": 2, "link_outside_source": 2, "duplicate_image": 1}
    reasons = {os.path.basename(s["source"]): s["reason"] for s in stats["skipped_samples"]}
    assert reasons["pipe.jpg"] == reasons["fifo_caption.jpg"] == "not_a_regular_file"
    assert reasons["zero.jpg"] == reasons["away.jpg"] == "link_outside_source"  # /dev/zero is outside too
    assert reasons["ok0.png"] == "duplicate_image"
    # a table whose paths leave its folder
    (src / "table").mkdir()
    with open(src / "table" / "pairs.csv", "w") as f:
        f.write(f"path,caption\n../ok1.jpg,up one\n{outside / 'secret.jpg'},absolute\n")
    (src / "table" / "here.jpg").write_bytes(solid_jpeg(16))
    with open(src / "table" / "pairs.csv", "a") as f:
        f.write("here.jpg,a local one\n")
    stats = shards.make_shards(shards.MakeShardsConfig(str(src / "table" / "pairs.csv"), str(tmp_path / "t"),
                                                       workers=1, progress=False))
    assert stats["count"] == 1 and stats["skipped"] == {"path_outside_source": 2}


def test_read_file_bounds(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    assert validate.read_file(str(big)) == b"x" * 2048
    with pytest.raises(validate.UnreadableFile, match="over the 1,024-byte limit") as info:
        validate.read_file(str(big), limit=1024)
    assert info.value.reason == "file_too_large"
    with pytest.raises(validate.UnreadableFile, match="a device"):
        validate.read_file("/dev/zero")
    import socket

    sock_path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock_path)
    try:
        with pytest.raises(validate.UnreadableFile, match="socket"):
            validate.read_file(sock_path)
    finally:
        server.close()


def test_skip_reasons_are_one_vocabulary():
    """Every skip make-shards or the loaders count is a SKIP_REASONS name; a misspelt one is refused."""
    from collections import Counter

    from clipforge.data.validate import SKIP_REASONS, RefusedPath, count_skip

    counts = Counter()
    count_skip(counts, "corrupt_image", 2)
    assert counts == {"corrupt_image": 2} and "corrupt_image" in SKIP_REASONS
    with pytest.raises(ValueError, match="SKIP_REASONS"):
        count_skip(counts, "corupt_image")
    with pytest.raises(ValueError, match="SKIP_REASONS"):
        RefusedPath("a.jpg", "outside")
