"""Embedding API: parity with encode_image / encode_text, preprocessing, zero-shot, bad inputs, resumable files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.data.images import ImageReadError, preprocess
from clipforge.serve.embed_file import progress_path, write_embeddings
from clipforge.data import CLIP_MEAN, CLIP_STD
from clipforge.serve.prompts import get_templates, template_sets
from conftest import DIGIT_NAMES as NAMES, digit_pixels


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clipforge.create_model("tiny-vit").eval()


def _mixed_images(tmp_path):
    """Odd sizes and modes, as files, PIL images and arrays."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (71, 30, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (33, 33), dtype=np.uint8)
    rgba = rng.integers(0, 256, (40, 45, 4), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(tall).save(tmp_path / "b.jpg", quality=90)
    return [
        str(tmp_path / "a.png"),
        tmp_path / "b.jpg",
        Image.fromarray(gray),
        Image.fromarray(rgba, "RGBA"),
        rgb,
        tall.astype(np.float32) / 255.0,
        gray[:, :, None],
    ]


def test_embed_images_matches_encode_image(tiny, tmp_path):
    images = _mixed_images(tmp_path)
    ref = tiny.encode_image(preprocess(images, tiny.image_size), normalize=True).detach().numpy()
    for bs in (1, 3, len(images)):  # single, uneven last batch, one batch
        emb = tiny.embed_images(images, batch_size=bs, workers=2 if bs == 3 else 0)
        assert emb.dtype == np.float32 and emb.shape == (len(images), tiny.config.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(emb, ref, atol=2e-6, rtol=0)
    # a preprocessed tensor batch is model input as is
    x = preprocess(images[:3], tiny.image_size)
    np.testing.assert_allclose(tiny.embed_images(x, batch_size=2), ref[:3], atol=2e-6, rtol=0)
    assert torch.is_grad_enabled()


def test_preprocess_geometry_and_normalisation():
    # a solid colour survives resize and crop exactly; the values are CLIP's mean/std normalisation
    im = Image.new("RGB", (90, 41), (200, 10, 77))
    x = preprocess([im], 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    want = (torch.tensor([200, 10, 77]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 5, 7], want.float(), atol=1e-6, rtol=0)
    # shorter side resized to 32 (bicubic), then the centre 32x32: compare with the two-step Pillow version
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    # 80 * 32 / 48 = 53.3 -> 53 wide (torchvision truncates); the centre offset (53 - 32) / 2 = 10.5 -> 10, as
    # torchvision's CenterCrop rounds it (half to even): OpenCLIP's eval transform, step for step
    two_step = Image.fromarray(arr).resize((53, 32), Image.BICUBIC).crop((10, 0, 42, 32))
    got = preprocess([arr], 32)[0]
    want = (torch.from_numpy(np.array(two_step)).permute(2, 0, 1) / 255.0 - torch.tensor(CLIP_MEAN)[:, None, None]) \
        / torch.tensor(CLIP_STD)[:, None, None]
    levels = ((got - want) * torch.tensor(CLIP_STD)[:, None, None] * 255).abs()
    assert levels.max() < 1e-3, levels.max()


def test_embed_texts_matches_encode_text(tiny):
    texts = ["a photo of a cat.", "", "a dog " * 60, "ünïcode text", "x"]  # empty, truncated, non-ASCII
    ref = tiny.encode_text(clipforge.tokenize(texts), normalize=True).detach().numpy()
    for bs in (1, 2, 5):
        emb = tiny.embed_texts(texts, batch_size=bs)
        assert emb.dtype == np.float32 and emb.shape == (5, tiny.config.embed_dim)
        np.testing.assert_allclose(emb, ref, atol=2e-6, rtol=0)
    np.testing.assert_allclose(tiny.embed_texts("a photo of a cat."), ref[:1], atol=2e-6, rtol=0)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="empty list of texts"):
        tiny.embed_texts([])
    with pytest.raises(TypeError, match="text 1 is a int"):
        tiny.embed_texts(["ok", 3])
    with pytest.raises(ValueError, match="no images"):
        tiny.embed_images([])
    with pytest.raises(ValueError, match="batch_size"):
        tiny.embed_images([np.zeros((8, 8, 3), np.uint8)], batch_size=0)
    good = np.full((20, 20, 3), 128, np.uint8)
    missing = str(tmp_path / "nope.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match="nope.jpg"):
        tiny.embed_images([good, missing])
    with pytest.raises(ImageReadError, match="junk.jpg.*not a recognised image format"):
        tiny.embed_images([str(tmp_path / "junk.jpg")])
    with pytest.raises(ImageReadError, match="uint8 or float"):
        tiny.embed_images([good.astype(np.int32)])
    with pytest.raises(ImageReadError, match=r"\[0, 1\]"):
        tiny.embed_images([good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"must be \(3, 32, 32\)"):
        tiny.embed_images([torch.zeros(3, 16, 16)])
    with pytest.raises(ImageReadError, match="unsupported image type"):
        tiny.embed_images([{"not": "an image"}])
    # skipped and reported
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable") as caught:
        emb = tiny.embed_images([good, missing, good, str(tmp_path / "junk.jpg")], batch_size=3, on_error="skip")
    assert caught[0].filename == __file__  # reported at the caller's line, not inside clipforge
    assert emb.shape[0] == 2
    emb2, skipped = tiny.embed_images([good, missing, good], on_error="skip", return_skipped=True)
    assert [i for i, _ in skipped] == [1] and "nope.jpg" in skipped[0][1]
    np.testing.assert_allclose(emb2, tiny.embed_images([good, good]), atol=1e-6)
    clf = tiny.zero_shot_classifier(["cat", "dog"], ["{}"])
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable.*nope.jpg") as caught:
        probs = tiny.classify([good, missing], clf, on_error="skip")
    assert probs.shape == (1, 2) and caught[0].filename == __file__  # reported at the caller's line


def test_zero_shot_classifier_is_the_prompt_ensemble(tiny):
    classes = ["cat", "small dog"]
    templates = ["a photo of a {}.", "art of the {}.", "{}"]
    clf = tiny.zero_shot_classifier(classes, templates, batch_size=4)  # batches straddle classes
    assert clf.shape == (2, tiny.config.embed_dim) and clf.dtype == np.float32
    for c, name in enumerate(classes):
        e = tiny.encode_text(clipforge.tokenize([t.format(name) for t in templates]), normalize=True).detach()
        want = torch.nn.functional.normalize(e.mean(0), dim=0).numpy()
        np.testing.assert_allclose(clf[c], want, atol=2e-6, rtol=0)
    probs = tiny.classify([np.zeros((30, 40, 3), np.uint8), np.full((9, 9), 255, np.uint8)], clf)
    assert probs.shape == (2, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_classifier_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="duplicate class name 'Cat'"):
        tiny.zero_shot_classifier(["cat", "dog", "Cat"], "simple")
    with pytest.raises(ValueError, match="class list is empty"):
        tiny.zero_shot_classifier([], "simple")
    with pytest.raises(ValueError, match="class 1 is ' '"):
        tiny.zero_shot_classifier(["cat", " "], "simple")
    with pytest.raises(ValueError, match="exactly one"):
        tiny.zero_shot_classifier(["cat"], ["a photo of a cat"])
    with pytest.raises(ValueError, match="unknown template set 'imagenet-81'"):
        tiny.zero_shot_classifier(["cat"], "imagenet-81")
    with pytest.raises(ValueError, match="classifier must be"):
        tiny.classify([np.zeros((8, 8), np.uint8)], np.zeros((3, 5), np.float32))
    p = tmp_path / "t.json"
    p.write_text(json.dumps(["a {} here", "the {}"]))
    assert get_templates(str(p)) == ["a {} here", "the {}"]


def test_imagenet_templates_are_the_papers_80():
    sets = template_sets()
    assert len(sets["imagenet"]) == 80 and len(set(sets["imagenet"])) == 80
    assert sets["imagenet"][0] == "a bad photo of a {}." and sets["imagenet"][-1] == "a tattoo of the {}."
    assert len(sets["cifar"]) == 18 and {"simple", "generic", "imagenet-7", "digits"} <= set(sets)
    meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES] == sets["imagenet"]
    assert [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES] == sets["imagenet-7"]


def test_zero_shot_on_real_digits(digits_clip):
    model, images, labels, test_idx = digits_clip
    pixels = digit_pixels(images[test_idx])
    clf = model.zero_shot_classifier(NAMES, ["a handwritten {}", "a scan of the number {}"])
    probs = model.classify(list(pixels), clf, batch_size=100)
    acc = float((probs.argmax(1) == labels[test_idx].numpy()).mean())
    assert acc > 0.5, f"zero-shot accuracy {acc:.1%} on {len(test_idx)} held-out digits (chance 10%)"


def _files(tmp_path, n=11, bad=(3, 8)):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(n):
        p = tmp_path / f"{i:02d}.png"
        if i in bad:
            p.write_bytes(b"corrupt")
        else:
            Image.fromarray(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("batch_size,stop", [(2, 1), (3, 2), (4, 3)])
def test_write_embeddings_resumes_to_the_same_array(tiny, tmp_path, batch_size, stop):
    paths = _files(tmp_path)
    full = tmp_path / "full.npy"
    res = write_embeddings(tiny, "image", paths, str(full), batch_size=batch_size)
    assert res["complete"] and res["rows"] == 9 and [s[0] for s in res["skipped"]] == [3, 8]
    assert not os.path.exists(progress_path(str(full)))

    out = str(tmp_path / "part.npy")

    def hook(b, rows):
        if b + 1 == stop:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        write_embeddings(tiny, "image", paths, out, batch_size=batch_size, on_batch=hook)
    state = json.loads(open(progress_path(out)).read())
    assert state["items_done"] == min(len(paths), stop * batch_size)  # (4, 3): all done, not yet finalised
    res = write_embeddings(tiny, "image", paths, out, batch_size=batch_size)
    assert res["complete"] and [s[0] for s in res["skipped"]] == [3, 8]
    np.testing.assert_array_equal(np.load(out), np.load(full))
    np.testing.assert_allclose(np.load(out), tiny.embed_images([p for i, p in enumerate(paths) if i not in (3, 8)]),
                               atol=2e-6)
    assert open(res["index"]).read().splitlines()[1:] == [f"{r},{p}" for r, p in
                                                           enumerate(p for i, p in enumerate(paths) if i not in (3, 8))]
    with pytest.raises(FileExistsError, match="already exists"):
        write_embeddings(tiny, "image", paths, out, batch_size=batch_size)


def test_write_embeddings_refuses_a_different_run(tiny, tmp_path):
    texts = [f"caption number {i}" for i in range(7)]
    out = str(tmp_path / "t.npy")
    res = write_embeddings(tiny, "text", texts, out, batch_size=2, stop_after_batches=2)
    assert not res["complete"] and res["rows"] == 4
    with pytest.raises(ValueError, match="different batch_size"):
        write_embeddings(tiny, "text", texts, out, batch_size=3)
    with pytest.raises(ValueError, match="different inputs"):
        write_embeddings(tiny, "text", texts[::-1], out, batch_size=2)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="different model"):
        write_embeddings(clipforge.create_model("tiny-vit").eval(), "text", texts, out, batch_size=2)
    res = write_embeddings(tiny, "text", texts, out, batch_size=2)
    assert res["complete"]
    np.testing.assert_allclose(np.load(out), tiny.embed_texts(texts), atol=2e-6)
    with pytest.raises(ValueError, match="empty"):
        write_embeddings(tiny, "text", [], str(tmp_path / "e.npy"))


@pytest.mark.cuda
def test_embed_on_gpu_with_autocast_matches_cpu(tmp_path):
    torch.manual_seed(0)
    cpu = clipforge.create_model("tiny-vit").eval()
    gpu = clipforge.create_model("tiny-vit").eval()
    gpu.load_state_dict(cpu.state_dict())
    images = _mixed_images(tmp_path)
    texts = ["a photo of a cat.", "a dog"]
    e_img = gpu.embed_images(images)  # device=None: moves the model to CUDA, autocast bf16/fp16
    assert next(gpu.parameters()).is_cuda
    e_txt = gpu.embed_texts(texts)
    assert e_img.dtype == np.float32
    cos = (e_img * cpu.embed_images(images, device="cpu")).sum(1)
    assert cos.min() > 0.99, cos
    assert (e_txt * cpu.embed_texts(texts, device="cpu")).sum(1).min() > 0.99
    np.testing.assert_allclose(gpu.embed_images(images, amp=False), cpu.embed_images(images, device="cpu"), atol=1e-4)


def test_non_finite_embeddings_never_leave_the_api(monkeypatch):
    import clipforge
    from clipforge.serve.embed import NonFiniteOutputError

    model = clipforge.create_model("tiny-vit").eval()
    real = model.encode_text

    def broken(tokens, normalize=False):
        out = real(tokens, normalize)
        out[-1, 0] = float("nan")
        return out

    monkeypatch.setattr(model, "encode_text", broken)
    with pytest.raises(NonFiniteOutputError, match="non-finite embeddings for 1 of 3 texts"):
        model.embed_texts(["a", "b", "c"])


def test_embed_images_memory_stays_flat(tmp_path):
    """embed_images grew ~4.5 KB of resident memory per image beyond its result (60,000 images: 392 ->
    793 MB; benchmarks/embed_memory.py measures that count). Here 2,000 against 12,000 images: what
    grows beyond the result's own bytes must stay under 1 KB per image (it was ~4.5 KB)."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from embed_memory import measure

    small, large = measure(2000, str(tmp_path)), measure(12000, str(tmp_path))
    growth = (large["extra_mb"] - large["result_mb"]) - (small["extra_mb"] - small["result_mb"])
    assert growth * 2**20 / 10000 < 1024, (small, large)
