"""Test-wide set-up. Runs before any test module imports triton or open_clip."""
import os
import sys
import types

import torch

# Triton decides at decoration time whether to interpret: without a GPU, run every Triton kernel
# through the interpreter on CPU tensors (how CI tests them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# open_clip (a test oracle) imports torchvision, whose PyPI wheel is built against a CUDA torch: its
# meta registrations refer to C++ ops that do not exist beside the CPU torch here. Skipping that one
# module is enough for what the tests use (models, tokenizer, ClipLoss).
if "torchvision" not in sys.modules:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on the 2-core CI machine")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)



DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # digits_clip's labels


def digit_pixels(images: torch.Tensor):
    """digits_clip's CLIP-normalised (N, 3, R, R) -> uint8 NumPy (N, R, R, 3): the real scans as ordinary images."""
    from clipforge.data import CLIP_MEAN, CLIP_STD

    x = images * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="session")
def digits_clip():
    """A tiny-vit trained contrastively on scikit-learn's bundled real digit scans (1,797 8x8 images,
    upscaled to 32x32, ink on paper) with varied captions, on 80% of them, plus the held-out split:
    (model in eval mode, images (N, 3, 32, 32) CLIP-normalised, labels (N,), held-out indices).
    Trained once per session (~25 s on 2 idle cores); tests must not modify the model."""
    import numpy as np
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    import clipforge
    from clipforge.data import CLIP_MEAN, CLIP_STD
    from clipforge.reference import contrastive_loss

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = (1.0 - F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)).expand(-1, 3, -1, -1)
    images = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    labels = torch.from_numpy(d.target).long()
    templates = ["a handwritten {w}", "the digit {d} written in ink", "a scan of the number {w}",
                 "a small picture of a {d}", "the number {d}, written by hand"]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(labels))
    train_idx, test_idx = perm[:n_train], perm[n_train:]
    model = clipforge.create_model("tiny-vit", attention_backend="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    # One thread: these small GEMMs gain little from two, and two OpenMP threads on a busy 2-core machine
    # were measured 17x slower per step (spinning barriers) than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_digits(model, opt, images, labels, train_idx, rng, templates, contrastive_loss, clipforge.tokenize)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), images, labels, test_idx


def _train_digits(model, opt, images, labels, train_idx, rng, templates, loss_fn, tokenize):
    import numpy as np

    for _ in range(300):
        idx = train_idx[torch.randint(len(train_idx), (64,))]
        caps = [templates[rng.integers(len(templates))].format(w=DIGIT_NAMES[int(l)], d=int(l)) for l in labels[idx]]
        img, txt, scale = model(images[idx], tokenize(caps))
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
