"""clipforge.contrastive_loss against OpenCLIP's ClipLoss (value and gradients), per backend.

fp32 relative error <= 1e-5 (norm-wise, on the loss and on every gradient). Every value of every axis is
covered: N {1, 2, 7, 64, 129, 1000}, d {16, 512}, chunk {1, 8, 64, non-divisor}, scale {1, 14.3, 100};
the full product on small N (d = 16), a few large cases otherwise. Triton runs under the interpreter
(TRITON_INTERPRET=1, set by conftest.py) at small N.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge import ops, reference
from clipforge.loss import ContrastiveLoss

open_clip = pytest.importorskip("open_clip")

HAS_CPP = ops.cpp_extension() is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="clipforge._C is not built")
SMALL_N = (1, 2, 7, 64, 129)
SCALES = (1.0, 14.3, 100.0)


def _features(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + d)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # positives a bit more similar than chance (cosine ~ 2.5 / sqrt(d) against ~1 / sqrt(d)), so the loss
    # stays O(1) at every scale: a loss near 0 would only measure fp32 cancellation, not the kernels
    txt = F.normalize(txt + (2.5 / math.sqrt(d)) * img, dim=1)
    return img.to(dtype), txt.to(dtype)


def _loss_and_grads(fn, img, txt, scale):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=img.dtype if img.dtype == torch.float64 else torch.float32, requires_grad=True)
    loss = fn(img, txt, s)
    loss.backward()
    return loss.detach().double(), img.grad.double(), txt.grad.double(), s.grad.double()


def _assert_close(got, want, rtol, what, floor=1e-6):
    """Norm-wise relative error <= rtol. `floor`: the size of the terms that cancel when the true value
    is 0 (N = 1: loss and gradients are exactly 0, sums of O(scale) terms), compared absolutely."""
    names = ("loss", "d_image", "d_text", "d_scale")
    for name, a, b in zip(names, got, want):
        err = (a - b).norm().item()
        ref = b.norm().item()
        bound = rtol * max(ref, floor)
        if not err <= bound:
            idx = (a - b).abs().argmax()
            pytest.fail(f"{what}: {name} relative error {err / max(ref, 1e-30):.3e} > {rtol:.0e}; worst element "
                        f"#{int(idx)}: got {a.flatten()[idx].item():.9g}, want {b.flatten()[idx].item():.9g}")


def _floor(n, scale):
    return scale if n == 1 else 1e-6


def _clip_loss(img, txt, s):
    return open_clip.loss.ClipLoss()(img, txt, s)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", SMALL_N)
@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: under the interpreter (conftest.py)
def test_backend_matches_openclip(backend, n, scale):
    img, txt = _features(n, 16)
    want = _loss_and_grads(_clip_loss, img, txt, scale)
    got = _loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, scale)
    _assert_close(got, want, 1e-5, f"{backend} n={n} scale={scale}", _floor(n, scale))


@needs_cpp
@pytest.mark.parametrize("chunk", (1, 8, 64, 5))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", SMALL_N)
def test_cpp_backend_matches_openclip_small(n, scale, chunk):
    img, txt = _features(n, 16)
    want = _loss_and_grads(_clip_loss, img, txt, scale)
    got = _loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="cpp", chunk_size=chunk), img, txt, scale)
    _assert_close(got, want, 1e-5, f"cpp n={n} scale={scale} chunk={chunk}", _floor(n, scale))


@needs_cpp
@pytest.mark.parametrize(
    "n, d, chunk, scale",
    [(1000, 512, 64, 100.0), (1000, 512, 333, 14.3), (1000, 16, None, 1.0), (129, 512, 8, 100.0), (7, 512, 1, 14.3)],
)
def test_cpp_backend_matches_openclip_large(n, d, chunk, scale):
    img, txt = _features(n, d)
    want = _loss_and_grads(_clip_loss, img, txt, scale)
    got = _loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="cpp", chunk_size=chunk), img, txt, scale)
    _assert_close(got, want, 1e-5, f"cpp n={n} d={d} scale={scale} chunk={chunk}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_large_batch_torch_and_cpp_against_float64(backend):
    # N = 1000, d = 512 against the float64 truth (ClipLoss in fp32 has its own error)
    img, txt = _features(1000, 512, seed=3)
    want = _loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 100.0)
    got = _loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, 100.0)
    _assert_close(got, want, 1e-5, f"{backend} vs float64")


@needs_cpp
@pytest.mark.parametrize("chunk", (1, 8, 5))
def test_cpp_float64_is_exact(chunk):
    img, txt = _features(37, 24, dtype=torch.float64)
    want = _loss_and_grads(reference.contrastive_loss, img, txt, 14.3)
    got = _loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="cpp", chunk_size=chunk), img, txt, 14.3)
    _assert_close(got, want, 1e-12, f"cpp float64 chunk={chunk}")


def test_triton_interpreter_d512_multi_block():
    # d = 512: K loop of 8 steps and two 256-wide feature slices in the backward; 70 rows: 2 row blocks
    img, txt = _features(70, 512)
    want = _loss_and_grads(_clip_loss, img, txt, 14.3)
    got = _loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="triton"), img, txt, 14.3)
    _assert_close(got, want, 1e-5, "triton d=512")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_half_precision(dtype):
    # half features, fp32 statistics: compare with the float64 loss of the same (rounded) features.
    # Tolerance: twice PyTorch's own error in that dtype (the reference run in `dtype` on CPU).
    img, txt = _features(70, 40, dtype=dtype)
    want = _loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 14.3)
    torch_half = _loss_and_grads(lambda i, t, s: reference.contrastive_loss(i, t, s.to(dtype)), img, txt, 14.3)
    got = _loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="triton"), img, txt, 14.3)
    for k, name in enumerate(("loss", "d_image", "d_text", "d_scale")):
        own = (torch_half[k] - want[k]).norm().item()
        err = (got[k] - want[k]).norm().item()
        assert err <= max(2 * own, 1e-6 * want[k].norm().item()), f"{dtype} {name}: {err:.3e} vs torch's own {own:.3e}"
    assert got[1].dtype == torch.float64  # (converted by the helper; the raw gradients keep the input dtype)


def test_triton_gradients_keep_input_dtype_and_repeat_bit_equal():
    img, txt = _features(33, 16, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        i = img.clone().requires_grad_(True)
        t = txt.clone().requires_grad_(True)
        loss = clipforge.contrastive_loss(i, t, torch.tensor(14.3), backend="triton")
        loss.backward()
        assert i.grad.dtype == torch.bfloat16 and t.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
        runs.append((loss, i.grad, t.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_cpp
def test_cpp_half_inputs_are_upcast_and_gradients_keep_dtype():
    img, txt = _features(20, 16, dtype=torch.bfloat16)
    i = img.clone().requires_grad_(True)
    t = txt.clone().requires_grad_(True)
    loss = clipforge.contrastive_loss(i, t, 14.3, backend="cpp")
    loss.backward()
    assert i.grad.dtype == torch.bfloat16 and t.grad.dtype == torch.bfloat16
    want = reference.contrastive_loss(img.double(), txt.double(), 14.3)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())


@needs_cpp
def test_module_float_scale_and_auto_backend():
    img, txt = _features(50, 16)
    loss_fn = ContrastiveLoss()
    want = _clip_loss(img, txt, torch.tensor(20.0))
    got = loss_fn(img, txt, 20.0)  # a float scale: no gradient for it, same value
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)
    assert ops.select_contrastive_backend(img.device) == "cpp"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp), "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    img, txt = _features(8, 16)
    with pytest.raises(ValueError, match="same shape"):
        clipforge.contrastive_loss(img, txt[:7], 1.0, backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        clipforge.contrastive_loss(img[:0], txt[:0], 1.0, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        clipforge.contrastive_loss(img, txt, 1.0, backend=backend, chunk_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        clipforge.contrastive_loss(img, txt, 1.0, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d", [(1000, 512), (4099, 768)])
def test_triton_cuda_matches_float64(n, d, dtype):
    # GPU twin of the interpreter tests: fp32 to 1e-5 (exact fp32 dots), half precision to twice
    # PyTorch's own error in that dtype (the reference computed in `dtype` on the GPU)
    img, txt = _features(n, d, dtype=dtype)
    img, txt = img.cuda(), txt.cuda()
    want = [x.cpu() for x in _loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 100.0)]
    got = [x.cpu() for x in _loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="triton"), img, txt, 100.0)]
    if dtype == torch.float32:
        _assert_close(got, want, 1e-5, f"triton cuda n={n} d={d}")
        return
    own = [x.cpu() for x in _loss_and_grads(lambda i, t, s: reference.contrastive_loss(i, t, s.to(dtype)),
                                            img, txt, 100.0)]
    for k, name in enumerate(("loss", "d_image", "d_text", "d_scale")):
        err, own_err = (got[k] - want[k]).norm().item(), (own[k] - want[k]).norm().item()
        assert err <= max(2 * own_err, 1e-6 * want[k].norm().item()), f"{dtype} {name}: {err:.3e} vs {own_err:.3e}"
