"""OpenCLIP's preprocessing: clipforge's per-image transforms against `open_clip.image_transform`.

Real photographs (scikit-learn's china.jpg and flower.jpg) cut to odd sizes and modes: the eval
transform must give OpenCLIP's pixels within 1/255 (before normalisation), and the training transform
OpenCLIP's RandomResizedCrop (same seed, same crop). Also the OpenCLIP-shaped entry points.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.model.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, shortest_side_geometry

open_clip = pytest.importorskip("open_clip")


def _photos():
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")), Image.fromarray(load_sample_image("flower.jpg"))


def _alpha(im):
    """RGBA with a real alpha ramp and a fully transparent corner (colour kept under it)."""
    w, h = im.size
    a = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
    a[: h // 4, : w // 4] = 0
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.fromarray(a.astype(np.uint8), "L"))
    return rgba


def _cases():
    china, flower = _photos()  # 640 x 427 each, landscape
    return {
        "landscape-rgb": china,
        "portrait-rgb": flower.crop((101, 13, 332, 410)),  # 231 x 397
        "tiny-rgb": china.resize((7, 5), Image.BICUBIC),
        "huge-rgb": flower.resize((2000, 1335), Image.BICUBIC),
        "grayscale": china.crop((5, 9, 338, 260)).convert("L"),  # 333 x 251
        "rgba": _alpha(flower.crop((50, 60, 351, 359))),  # 301 x 299
        "cmyk": china.crop((0, 0, 250, 401)).convert("CMYK"),  # 250 x 401, portrait
        "palette": flower.crop((30, 40, 229, 351)).quantize(64),  # 199 x 311, mode P
        "gray-alpha": _alpha(china.crop((200, 100, 350, 251))).convert("LA"),  # 150 x 151
        "wide-strip": flower.crop((0, 180, 640, 241)),  # 640 x 61
        "tall-strip": china.crop((300, 0, 337, 420)),  # 37 x 420
        "exact-224": flower.crop((10, 10, 234, 234)),
        "odd-excess": china.crop((0, 0, 225, 224)),  # a crop offset of 0.5: torchvision rounds half to even
        "bilevel": flower.crop((0, 0, 300, 260)).convert("1"),
    }


CASES = _cases()


def _levels(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Normalised (3, S, S) back to 0..255."""
    return (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255


def _assert_within_one_level(ours: torch.Tensor, ref: torch.Tensor, what: str, mean=CLIP_MEAN, std=CLIP_STD):
    assert ours.shape == ref.shape and ours.dtype == torch.float32, (ours.shape, ref.shape)
    diff = (_levels(ours, mean, std) - _levels(ref, mean, std)).abs()
    assert diff.max().item() <= 1.0 + 1e-3, f"{what}: {diff.max().item():.3f}/255 from OpenCLIP's pixels"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("size", [224, 240, 33])
def test_eval_transform_equals_openclips(name, size):
    im = CASES[name]
    ref = open_clip.image_transform(size, is_train=False)(im)
    _assert_within_one_level(clipforge.image_transform(size, is_train=False)(im), ref, f"{name} at {size}")


@pytest.mark.parametrize("name", ["landscape-rgb", "portrait-rgb", "rgba", "cmyk"])
def test_eval_transform_with_bilinear_and_other_statistics(name):
    im, mean, std = CASES[name], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ref = open_clip.image_transform(224, is_train=False, mean=mean, std=std, interpolation="bilinear")(im)
    ours = clipforge.image_transform(224, is_train=False, mean=mean, std=std, interpolation="bilinear")(im)
    _assert_within_one_level(ours, ref, name, mean, std)


@pytest.mark.parametrize("name", ["landscape-rgb", "portrait-rgb", "tiny-rgb", "grayscale", "rgba", "cmyk"])
@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 1.0)])
def test_train_transform_is_openclips_random_resized_crop(name, scale):
    """Same torch seed -> the same crop box, resized the same way (RandomResizedCrop, bicubic)."""
    im = CASES[name]
    ref_t = open_clip.image_transform(224, is_train=True, aug_cfg=dict(scale=scale))
    ours_t = clipforge.image_transform(224, is_train=True, scale=scale)
    for seed in range(4):
        torch.manual_seed(seed)
        ref = ref_t(im)
        torch.manual_seed(seed)
        _assert_within_one_level(ours_t(im), ref, f"{name} seed {seed}")


def test_training_crops_follow_the_scale_and_ratio_ranges():
    """The loaders' NumPy-driven draws obey the same ranges (torchvision's sampling, another RNG)."""
    from clipforge.model.transforms import random_resized_crop_box

    rng = np.random.default_rng(0)
    W, H = 500, 480
    boxes = [random_resized_crop_box(W, H, rng, (0.3, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    areas = np.array([(r - l) * (b - t) for l, t, r, b in boxes]) / (W * H)
    ratios = np.array([(r - l) / (b - t) for l, t, r, b in boxes])
    assert areas.min() > 0.29 and areas.max() <= 1.0 and areas.min() < 0.32 and areas.max() > 0.95
    assert ratios.min() > 0.74 and ratios.max() < 1.35 and ratios.min() < 0.8 and ratios.max() > 1.25
    assert all(0 <= l < r <= W and 0 <= t < b <= H for l, t, r, b in boxes)


def test_the_geometry_is_torchvisions():
    # 80 x 48 -> 53 x 32 (int() of 53.33), offset round(10.5) = 10 (half to even; DALI's loaders use 11)
    assert shortest_side_geometry(80, 48, 32) == (53, 32, 10, 0)
    assert shortest_side_geometry(48, 81, 32) == (32, 54, 0, 11)
    assert shortest_side_geometry(7, 5, 224) == (313, 224, 44, 0)


def test_preprocess_from_files_is_the_eval_transform(tmp_path):
    """The embedding API's path (files read, EXIF-free here) gives the transform's pixels exactly."""
    from clipforge.data.images import preprocess

    paths, refs = [], []
    for name in ("portrait-rgb", "grayscale", "rgba", "palette", "gray-alpha", "cmyk"):
        im = CASES[name]
        path = tmp_path / (name + (".jpg" if im.mode == "CMYK" else ".png"))
        im.save(path)
        paths.append(str(path))
        with Image.open(path) as back:
            refs.append(open_clip.image_transform(64, is_train=False)(back))
    got = preprocess(paths, 64)
    for name, ours, ref in zip(paths, got, refs):
        _assert_within_one_level(ours, ref, name)


def test_sixteen_bit_images_are_scaled_not_saturated():
    """The one deliberate difference from OpenCLIP: convert("RGB") saturates 16-bit images at 255."""
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    levels = _levels(clipforge.image_transform(32, is_train=False)(im))
    assert 100 < levels.mean().item() < 155  # a ramp over the whole range: mid-grey on average, not white


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(224, interpolation="lanczos")
    with pytest.raises(ValueError, match="longest"):
        ImageTransform(224, resize_mode="longest")
    with pytest.raises(ValueError, match="std"):
        ImageTransform(224, std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="area"):
        ImageTransform(224, is_train=True, area=(0.5, 1.5))
    with pytest.raises(TypeError, match="Pillow image"):
        ImageTransform(224)(np.zeros((8, 8, 3), np.uint8))


def test_create_model_and_transforms_and_get_tokenizer(tmp_path):
    ref = open_clip.create_model("ViT-S-32")
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    model, train_t, eval_t = clipforge.create_model_and_transforms("ViT-S-32", pretrained=str(tmp_path / "sd.pt"))
    assert not model.training and train_t.is_train and not eval_t.is_train
    assert eval_t.size == train_t.size == 224 and eval_t.mean == CLIP_MEAN and train_t.area == (0.9, 1.0)
    ref.eval()
    image = eval_t(CASES["portrait-rgb"])[None]
    texts = ["a photo of a cat", "a diagram"]
    tok = clipforge.get_tokenizer("ViT-S-32")
    assert torch.equal(tok(texts), open_clip.get_tokenizer("ViT-S-32")(texts))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), ref.encode_image(image), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tok(texts)), ref.encode_text(tok(texts)), rtol=1e-5, atol=1e-5)
    fresh, _, _ = clipforge.create_model_and_transforms("tiny-vit", attention_backend="sdpa")
    assert fresh.image_size == 32 and "tiny-vit" in clipforge.list_models()
    with pytest.raises(FileNotFoundError, match="release tag.*no network"):
        clipforge.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="overrides"):
        clipforge.create_model_and_transforms("ViT-S-32", pretrained=str(tmp_path / "sd.pt"), quick_gelu=True)
