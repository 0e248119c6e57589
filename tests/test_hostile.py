"""Hostile inputs stay refused: one test per kind of file built to run code, crash a reader or lead it
outside its folder, so that no later change reopens one. Each asserts the refusal (or the harmless
reading) and that nothing ran or was written: a payload's `__reduce__` would create a marker file.

Kinds tested elsewhere, not repeated here: a plain pickle .pt that would run code
(test_model.py::test_checkpoint_that_would_run_code_is_refused), a truncated torch.save .pt
(test_model.py::test_corrupted_checkpoint), archives that would hang `load` or blow up its memory
(test_model.py::test_hostile_checkpoints_are_refused_within_a_second_and_100mb), a DeepSpeed file
(torch.save format) that would run code (test_train.py::test_deepspeed_checkpoint_files_load_without_code),
make-shards source links leading out (to a file, to /dev/zero), pipes, and table paths with `..` or
absolute (test_shards.py::test_make_shards_refuses_pipes_devices_links_out_and_duplicate_stems), a tar cut
short (test_data.py::test_a_truncated_tar_is_counted_and_warned_about).
"""
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import pytest
import torch

import clipforge
from clipforge.model.weights import CheckpointError
from test_shards import caption_of, color_of, solid_jpeg


def _payload(marker, how="system"):
    """An object whose unpickling would create `marker` (by os.system, exec or eval)."""
    code = f"open({str(marker)!r}, 'w').close()"

    class Payload:
        def __reduce__(self):
            if how == "system":
                return os.system, (f"touch {marker}",)
            return (exec, (code,)) if how == "exec" else (eval, (f"({code}, 0)[1]",))

    return Payload()


def _one_line_refusal(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- .pt pickles
def test_torch_zip_pt_that_would_run_code_is_refused_by_load(tmp_path):
    """torch.save's zip format (the plain-pickle one is test_model.py's), as a file and as the DeepSpeed
    module state of a training checkpoint directory (the same reader, reached through the directory)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": _payload(marker)}, path)
    with pytest.raises(CheckpointError, match="could not be read as a CLIP checkpoint") as info:
        clipforge.load(str(path))
    _one_line_refusal(info, path)
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    (step / "ds").mkdir(parents=True)
    (step / "COMPLETE").write_text("2\n")
    torch.save({"module": {"visual.proj": _payload(marker)}}, step / "ds" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt could not be read"):
        clipforge.load(str(step), model_name="tiny-vit")
    assert not marker.exists()


@pytest.mark.parametrize("reader, fmt", [("trainer_state", "zip"), ("trainer_state", "legacy"),
                                         ("deepspeed", "legacy")])  # (deepspeed, zip): test_train.py
def test_training_checkpoint_files_that_would_run_code_are_refused(tmp_path, reader, fmt):
    """The trainer state (train/checkpoint.py) and DeepSpeed's own files (train/deepspeed_compat.py,
    which the trainer installs as DeepSpeed's checkpoint loader) are read with weights_only=True."""
    marker = tmp_path / "pwned"
    name = "trainer_rank0.pt" if reader == "trainer_state" else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    obj = {"step": 3, "optimizer_state_dict": _payload(marker)}
    if fmt == "zip":
        torch.save(obj, tmp_path / name)
    else:
        with open(tmp_path / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    if reader == "trainer_state":
        from clipforge.train.checkpoint import load_trainer_state

        def read():
            return load_trainer_state(str(tmp_path), 0)
    else:
        from clipforge.train.deepspeed_compat import _weights_only_load

        def read():
            return _weights_only_load(str(tmp_path / name))
    if reader == "trainer_state":  # resume's reader: one sentence naming the file (CheckpointError)
        from clipforge.model.weights import CheckpointError

        with pytest.raises(CheckpointError, match=r"trainer_rank0.pt cannot be read \(UnpicklingError: Weights only"):
            read()
    else:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            read()
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02", b"PK\x03\x04 truncated"])
def test_a_damaged_trainer_state_is_one_sentence(tmp_path, content):
    from clipforge.model.weights import CheckpointError
    from clipforge.train.checkpoint import load_trainer_state

    (tmp_path / "trainer_rank0.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="trainer_rank0.pt cannot be read .*damaged"):
        load_trainer_state(str(tmp_path), 0)


# ----------------------------------------------------------------------------- TorchScript archives
@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> tuple[bytes, dict]:
    """A real TorchScript archive (code/, constants.pkl, data.pkl) of tiny-vit, as OpenAI releases them,
    and the state dict traced."""
    import warnings

    model = clipforge.create_model("tiny-vit").eval()
    images, tokens = torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)
    path = tmp_path_factory.mktemp("ts") / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning, and torch.jit's deprecation
        torch.jit.trace(model, (images, tokens), check_trace=False).save(str(path))
    return path.read_bytes(), model.state_dict()


@pytest.mark.parametrize("how", ["system", "exec", "eval"])
def test_torchscript_archive_whose_pickle_would_run_code_is_refused(tmp_path, how):
    """An archive laid out like OpenAI's (so read by the restricted unpickler, not torch.load) whose
    data.pkl names os.system / exec / eval: refused by name, nothing run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"visual.proj": _payload(marker, how)}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__/model.py", f"import os\nos.system('touch {marker}')\n")
    with pytest.raises(CheckpointError, match=r"refusing to load (posix\.system|__builtin__\.(exec|eval)) from a "
                                              r"checkpoint") as info:
        clipforge.load(str(path))
    _one_line_refusal(info, path)
    assert not marker.exists()


def test_torchscript_archive_code_is_never_compiled_nor_run(tmp_path, traced, monkeypatch):
    """A real archive whose code/ files are replaced by Python that would create the marker: its tensors
    load through the restricted unpickler alone (torch.jit.load and torch.load are never called)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "tiny.pt"
    with zipfile.ZipFile(io.BytesIO(traced[0])) as src, zipfile.ZipFile(path, "w") as out:
        code = [n for n in src.namelist() if "/code/" in n]
        assert code
        for name in src.namelist():
            data = f"import os\nos.system('touch {marker}')\n".encode() if name in code else src.read(name)
            out.writestr(zipfile.ZipInfo(name), data)

    def forbidden(*args, **kwargs):
        raise AssertionError("a TorchScript archive must not reach torch.jit.load / torch.load")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = clipforge.load(str(path), model_name="tiny-vit").state_dict()
    assert loaded.keys() == traced[1].keys() and all(torch.equal(loaded[k], v) for k, v in traced[1].items())
    assert not marker.exists()


# ----------------------------------------------------------------------------- safetensors headers
def _safetensors_bytes(kind: str) -> bytes:
    tensor = {"visual.proj": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    if kind == "length-past-the-end":  # the 8-byte header length is larger than the whole file
        return struct.pack("<Q", 1_000_000) + json.dumps(tensor).encode() + bytes(16)
    if kind == "length-2-to-the-63":  # a length no reader may try to allocate
        return struct.pack("<Q", 1 << 63) + json.dumps(tensor).encode() + bytes(16)
    if kind == "header-not-json":
        return struct.pack("<Q", 16) + b"{not json at all" + bytes(16)
    if kind == "offsets-past-the-data":
        tensor["visual.proj"]["data_offsets"] = [1 << 40, (1 << 40) + 16]
    elif kind == "offsets-not-covering-the-data":  # the header claims 16 bytes, the file holds 8
        header = json.dumps(tensor).encode()
        return struct.pack("<Q", len(header)) + header + bytes(8)
    elif kind == "shape-disagrees-with-offsets":
        tensor["visual.proj"]["shape"] = [1 << 30]
    header = json.dumps(tensor).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])  # .pt: sniffed as safetensors by its header
@pytest.mark.parametrize("kind", ["length-past-the-end", "length-2-to-the-63", "header-not-json",
                                  "offsets-past-the-data", "offsets-not-covering-the-data",
                                  "shape-disagrees-with-offsets"])
def test_safetensors_with_a_bad_header_is_refused_in_one_sentence(tmp_path, kind, suffix):
    path = tmp_path / f"{kind}{suffix}"
    path.write_bytes(_safetensors_bytes(kind))
    with pytest.raises(CheckpointError, match=r"could not be read as a CLIP checkpoint \(SafetensorError: ") as info:
        clipforge.load(str(path))
    _one_line_refusal(info, path)


# ----------------------------------------------------------------------------- truncated and empty files
@pytest.mark.parametrize("kind", ["zero-byte.pt", "zero-byte.safetensors", "truncated.safetensors",
                                  "truncated-archive.pt", "archive-without-data.pt"])
def test_truncated_and_empty_files_are_refused_in_one_sentence(tmp_path, traced, kind):
    """A zero-byte .pt once raised IndexError from the error handler itself (an exception without a
    message); a truncated torch.save .pt is test_model.py's."""
    from safetensors.torch import save_file

    path = tmp_path / kind
    if kind.startswith("zero-byte"):
        path.write_bytes(b"")
    elif kind == "truncated.safetensors":
        save_file({"visual.proj": torch.zeros(64, 48)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "truncated-archive.pt":  # the zip's central directory is lost with its tail
        path.write_bytes(traced[0][: len(traced[0]) // 2])
    else:  # a zip that looks like TorchScript (code/) but lost its data.pkl
        with zipfile.ZipFile(io.BytesIO(traced[0])) as src, zipfile.ZipFile(path, "w") as out:
            for name in src.namelist():
                if not name.endswith("/data.pkl"):
                    out.writestr(zipfile.ZipInfo(name), src.read(name))
    with pytest.raises(CheckpointError) as info:
        clipforge.load(str(path))
    msg = _one_line_refusal(info, path)
    assert "could not be read as a CLIP checkpoint" in msg or "without data.pkl" in msg
    if kind == "zero-byte.pt":
        assert "(EOFError: no message; the file holds 0 bytes)" in msg


# ----------------------------------------------------------------------------- webdataset tar members
def _tree(root) -> dict:
    """Every path below `root` with its size (a link as its target): what a write outside would change."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            out[os.path.relpath(p, root)] = os.readlink(p) if os.path.islink(p) else os.path.getsize(p)
    return out


def _hostile_tar(path, outside) -> dict[str, int]:
    """A foreign shard whose members are named with `..` and an absolute path, or are symlinks and hard
    links (to a file outside, to another member, to /etc/passwd). -> {key: colour index} of its
    regular samples."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def link(tar, name, kind, target):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    regular = {"ok": 0, "../../escaped/up": 1, f"{outside}/abs": 2}
    with tarfile.open(path, "w") as tar:
        for key, i in regular.items():
            add(tar, f"{key}.jpg", solid_jpeg(i))
            add(tar, f"{key}.txt", caption_of(i))
        link(tar, "sym.jpg", tarfile.SYMTYPE, str(outside / "secret.jpg"))
        add(tar, "sym.txt", caption_of(3))
        link(tar, "symdir", tarfile.SYMTYPE, str(outside))
        add(tar, "symdir/secret.txt", caption_of(4))  # through the directory link: outside/secret.txt
        link(tar, "hard.jpg", tarfile.LNKTYPE, "ok.jpg")
        add(tar, "hard.txt", caption_of(5))
        link(tar, "passwd.jpg", tarfile.LNKTYPE, "/etc/passwd")
        add(tar, "passwd.txt", caption_of(6))
    return regular


def _backends():
    import importlib.util

    try:
        dali = importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no nvidia package at all
        dali = False
    return (["dali"] if dali else []) + ["pytorch"]


@pytest.mark.parametrize("backend", _backends())
def test_tar_members_named_out_or_linked_out_never_read_or_write_outside(tmp_path, backend):
    """Shards are never extracted: a member is read at its offset inside its own tar, whatever its name
    (`../../x`, `/abs/x` are keys like any other), and a symlink or hard-link member is not a file:
    the sample it belonged to has no image and is skipped and counted (missing_image), the link's target
    (a file outside, another member, /etc/passwd) is never read. Nothing is written outside the cache."""
    from clipforge import data
    from clipforge.data import CLIP_MEAN, CLIP_STD, DataConfig, build_train_loader
    from clipforge.serve.datasets import _webdataset_samples

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(solid_jpeg(9))
    shards = tmp_path / "a" / "b" / "shards"
    shards.mkdir(parents=True)
    regular = _hostile_tar(shards / "00000.tar", outside)
    before = _tree(tmp_path)
    cache = tmp_path / "cache"

    catalog = data.build_catalog(str(shards), cache_dir=str(cache))
    assert catalog.shard(0).keys == list(regular) and dict(catalog.skipped) == {"missing_image": 4}
    cfg = DataConfig(path=str(shards), batch_size=2, loader=backend, num_workers=1, shuffle=False,
                     cache_dir=str(cache))

    def tokenizer(texts):  # "sample 17" -> [17, 0, ...]
        out = torch.zeros(len(texts), 77, dtype=torch.long)
        out[:, 0] = torch.tensor([int(t.split()[1]) for t in texts])
        return out

    loader = build_train_loader(cfg, 0, 1, 0, 0, 24, tokenizer, with_keys=True)
    got = {}
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for images, tokens, keys in loader:
        colours = ((images * std + mean) * 255).mean(dim=(2, 3))
        for key, tok, col in zip(keys, tokens[:, 0].tolist(), colours):
            assert (col - torch.tensor(color_of(tok), dtype=torch.float32)).abs().max() < 6, key
            got[key] = tok
    assert got == regular  # the tar's own bytes, paired; never the outside secret (colour 9)
    assert loader.stats["skipped"] == {"missing_image": 4}
    # the evaluation reader (`clipforge eval` on shards) reads the same way
    samples = dict(_webdataset_samples(str(shards)))
    assert {k.split(":", 1)[1] for k, c in samples.items() if "jpg" in c} == set(regular)
    assert all(set(c) == {"txt"} for k, c in samples.items() if k.split(":", 1)[1] not in regular)
    after = {p: v for p, v in _tree(tmp_path).items() if p != "cache" and not p.startswith("cache" + os.sep)}
    assert after == before
    assert not os.path.exists(tmp_path / "a" / "escaped") and not (outside / "abs.jpg").exists()


# ----------------------------------------------------------------------------- make-shards source folders
def test_make_shards_does_not_follow_directory_links_out_and_writes_only_into_out(tmp_path):
    """A directory link leading out of the source (and one looping back into it) is not walked: no file
    behind it is read. A hard link is a regular file of the folder (the file system put it there) and is
    read like one. Nothing is written outside OUT; the shards' member names are make-shards' own keys,
    never the source names (test_shards.py has the file links, pipes, devices and table paths)."""
    from clipforge.data import make_shards as shards
    from clipforge.data import webdataset

    src, outside = tmp_path / "src", tmp_path / "outside"
    src.mkdir()
    (outside / "deep").mkdir(parents=True)
    for i in range(2):
        (src / f"ok{i}.jpg").write_bytes(solid_jpeg(i))
        (src / f"ok{i}.txt").write_bytes(caption_of(i))
    for i in range(3):
        (outside / "deep" / f"secret{i}.jpg").write_bytes(solid_jpeg(10 + i))
        (outside / "deep" / f"secret{i}.txt").write_bytes(caption_of(10 + i))
    (src / "away").symlink_to(outside / "deep", target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)
    os.link(outside / "deep" / "secret0.jpg", src / "hard.jpg")
    (src / "hard.txt").write_bytes(caption_of(20))
    before = _tree(tmp_path)
    out = tmp_path / "out"
    assert shards.main([str(src), str(out), "--quiet", "--workers", "1"]) == 0
    stats = json.load(open(out / "stats.json"))
    assert stats["count"] == 3 and stats["seen"] == 3 and stats["skipped"] == {}
    captions = set()
    with tarfile.open(out / "00000.tar") as tar:
        for m in tar:
            key, ext = webdataset.split_name(m.name)
            assert m.isreg() and "/" not in m.name and key.isdigit() and ext in ("jpg", "txt", "json")
            if ext == "txt":
                captions.add(tar.extractfile(m).read())
    assert captions == {caption_of(0), caption_of(1), caption_of(20)}
    assert {p: v for p, v in _tree(tmp_path).items() if p != "out" and not p.startswith("out" + os.sep)} == before
