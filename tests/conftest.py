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


# ------------------------------------------------ helpers of the loss tests (contrastive and SigLIP)
LOSS_NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")  # what loss_and_grads returns, in order


def loss_features(n, d, dtype=torch.float32, seed=0):
    """(image, text) features (n, d), L2-normalised in float64, then cast to `dtype`. The positives are a bit
    more similar than chance (cosine ~ 2.5 / sqrt(d) against ~1 / sqrt(d)), as a trained model's: the
    softmax loss stays O(1) at every scale (a loss near 0 would only measure fp32 cancellation, not the
    kernels), and both signs of SigLIP's z matter at every (t, b)."""
    import math

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + d)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(txt + (2.5 / math.sqrt(d)) * img, dim=1)
    return img.to(dtype), txt.to(dtype)


def loss_and_grads(fn, img, txt, *scalars):
    """fn(image, text, *scalars).backward() on fresh leaves: (loss, d_image, d_text, one gradient per scalar),
    all float64. The scalars (logit scale, bias) become 0-d leaves, float64 for float64 features, else float32."""
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    leaves = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in scalars]
    loss = fn(img, txt, *leaves)
    loss.backward()
    return (loss.detach().double(), img.grad.double(), txt.grad.double(), *(x.grad.double() for x in leaves))


def assert_close(got, want, rtol, what, floor=0.0):
    """Norm-wise relative error <= rtol on each result of loss_and_grads. `floor`: reference norms below it
    count as `floor`, i.e. are compared absolutely (the size of the terms that cancel where the true value
    is 0)."""
    for name, a, b in zip(LOSS_NAMES, got, want):
        err = (a - b).norm().item()
        ref = b.norm().item()
        if not err <= rtol * max(ref, floor):
            idx = (a - b).abs().argmax()
            pytest.fail(f"{what}: {name} relative error {err / max(ref, 1e-30):.3e} > {rtol:.0e}; worst element "
                        f"#{int(idx)}: got {a.flatten()[idx].item():.9g}, want {b.flatten()[idx].item():.9g}")


def assert_within_twice(got, own, want, what):
    """Each result's error against `want` within twice that of `own` (PyTorch's own run in the same dtype)."""
    for name, g, o, w in zip(LOSS_NAMES, got, own, want):
        own_err = (o - w).norm().item()
        err = (g - w).norm().item()
        assert err <= max(2 * own_err, 1e-6 * w.norm().item()), f"{what} {name}: {err:.3e} vs {own_err:.3e}"


def count_tl_dots(kernel, monkeypatch) -> dict:
    """Count tl.dot work as the Triton interpreter executes it (2 M N K per tile dot, padding included):
    the returned {"flops": 0} grows with every dot until the test ends. Skips the test when `kernel` (one
    of the op's @triton.jit kernels) is not interpreted."""
    import math

    from triton.runtime import interpreter

    from clipforge.kernels.utils import is_interpreted

    if not is_interpreted(kernel):
        pytest.skip("counts tl.dot under the Triton interpreter")
    dots = {"flops": 0}
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, acc, *args):
        *batch, rows, inner = a.data.shape
        dots["flops"] += 2 * rows * inner * b.data.shape[-1] * math.prod(batch)
        return create_dot(self, a, b, acc, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    return dots


def run_ranks(script: str, world: int, tmp_path):
    """Run `script` on `world` gloo ranks, one subprocess each (`python script RANK WORLD INIT OUT`: the
    distributed loss tests' own worker), and return what every rank torch.save'd to OUT, in rank order."""
    import subprocess

    init_file = tmp_path / "init"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), str(world), str(init_file), str(tmp_path / f"rank{r}.pt")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{outputs[r]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def rel(a, b):
    """Norm-wise relative error of `a` against the float64 `b`."""
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()


def finish_rank(results: dict, out_file: str, unequal) -> None:
    """The end of a run_ranks worker: results["unequal"] = the ValueError message of `unequal()` (a loss
    call with unequal local batches, which must raise on every rank; None if it returned), then `results`
    saved for run_ranks, and the process group left."""
    import torch.distributed as dist

    try:
        unequal()
        results["unequal"] = None
    except ValueError as exc:
        results["unequal"] = str(exc)
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def global_batch(n: int, dim: int, seed: int):
    """The distributed loss tests' global batch: (n, dim) float64 image and text rows, L2-normalised, each
    caption near its image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64) + 0.5 * img, dim=1)
    return img, txt
