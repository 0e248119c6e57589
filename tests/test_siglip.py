"""clipforge.siglip_loss against float64 and OpenCLIP's SigLipLoss (value and the four gradients), per backend.

fp32 relative error <= 1e-5, norm-wise, on the loss and on every gradient (image, text, t, b), against the
float64 reference and against SigLipLoss in fp32. Axes: N {1, 7, 300, 1000}, d {8, 64, 200}, row chunks
{auto, uneven (3 chunks, the last shorter)}, (t, b) drawn from t in [1, 100] x b in [-20, 5] (each case
its own pair, every pair used). cpp and chunked run the full product; triton runs under the interpreter
(TRITON_INTERPRET=1, set by conftest.py) on CPU tensors, the same kernels and row-chunked driver as on a
GPU, on the smaller shapes (the interpreter takes ~0.1 s per tile dot) plus one 1000-row case.
Also here: fp16 / bf16 within twice PyTorch's own error (and OpenCLIP's under autocast), the elementwise
maths over the whole range of logits, the GEMM count (three with gradients, one without), the gradients
computed in forward and scaled in backward, routing, and the C++ boundary.
"""
import math

import pytest
import torch

import clipforge
from clipforge import ops, reference
from clipforge.siglip_loss import SigLipLoss, siglip_loss_and_grads
from conftest import assert_close, assert_within_twice, count_tl_dots, loss_and_grads, loss_features

open_clip = pytest.importorskip("open_clip")

HAS_CPP = ops.siglip_kernels("cpp") is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="clipforge._C is not built (or has no siglip_forward)")
# (t, b): the corners of [1, 100] x [-20, 5], SigLIP's initialisation (10, -10) and two inner points
SCALE_BIAS = [(10.0, -10.0), (1.0, 5.0), (100.0, -20.0), (1.0, -20.0), (100.0, 5.0), (37.0, -3.5)]


def _openclip(img, txt, t, b):
    return open_clip.loss.SigLipLoss()(img, txt, t, b)


def _ours(backend, chunk_size=None):
    return lambda i, t, s, b: clipforge.siglip_loss(i, t, s, b, backend=backend, chunk_size=chunk_size)


def _check_against_both(backend, n, d, chunk_size, t, b):
    img, txt = loss_features(n, d)
    got = loss_and_grads(_ours(backend, chunk_size), img, txt, t, b)
    what = f"{backend} n={n} d={d} chunk={chunk_size} t={t} b={b}"
    assert_close(got, loss_and_grads(reference.siglip_loss, img.double(), txt.double(), t, b), 1e-5, what + " vs float64")
    assert_close(got, loss_and_grads(_openclip, img, txt, t, b), 1e-5, what + " vs SigLipLoss")
    with torch.no_grad():  # the value alone: the path that computes no gradient
        value = _ours(backend, chunk_size)(img, txt, torch.tensor(t), torch.tensor(b)).double()
    assert abs(value - got[0]) <= 1e-5 * got[0], f"{what}: value without gradients {value.item()} != {got[0].item()}"


def _uneven(n):
    return max(1, n // 3 + 1)  # 3 chunks, the last one shorter (and, for n = 1000, not whole 128-row blocks)


FULL = [(n, d, chunk, SCALE_BIAS[k % len(SCALE_BIAS)])
        for k, (n, d, chunk) in enumerate((n, d, c) for n in (1, 7, 300, 1000) for d in (8, 64, 200)
                                          for c in ("auto", "uneven"))]


@pytest.mark.parametrize("n, d, chunk, tb", FULL, ids=[f"n{n}-d{d}-{c}-t{tb[0]:g}-b{tb[1]:g}" for n, d, c, tb in FULL])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "chunked"])
def test_row_chunked_backends_match_float64_and_openclip(backend, n, d, chunk, tb):
    _check_against_both(backend, n, d, None if chunk == "auto" else _uneven(n), *tb)


TORCH = [(n, d, SCALE_BIAS[k % len(SCALE_BIAS)]) for k, (n, d) in enumerate((n, d) for n in (1, 7, 300) for d in (8, 200))]


@pytest.mark.parametrize("n, d, tb", TORCH, ids=[f"n{n}-d{d}-t{tb[0]:g}-b{tb[1]:g}" for n, d, tb in TORCH])
def test_torch_reference_backend_matches_float64_and_openclip(n, d, tb):
    _check_against_both("torch", n, d, None, *tb)


# Triton under the interpreter: every N but 1000 with every d, uneven chunks on the multi-block shapes,
# one 1000-row case (8 row blocks, several column splits with the interpreter's 4 "SMs")
TRITON = ([(n, d, None, SCALE_BIAS[k % len(SCALE_BIAS)]) for k, (n, d) in
           enumerate((n, d) for n in (1, 7, 300) for d in (8, 64, 200))]
          + [(300, 64, _uneven(300), (100.0, -20.0)), (300, 200, _uneven(300), (1.0, 5.0)),
             (1000, 64, _uneven(1000), (10.0, -10.0))])


@pytest.mark.parametrize("n, d, chunk, tb", TRITON, ids=[f"n{n}-d{d}-chunk{c}-t{tb[0]:g}-b{tb[1]:g}" for n, d, c, tb in TRITON])
def test_triton_matches_float64_and_openclip(n, d, chunk, tb):
    _check_against_both("triton", n, d, chunk, *tb)


@pytest.mark.parametrize("backend", ["torch", "triton", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_extreme_logits_stay_exact(backend):
    # logits spread over [-300, 300] (t = 100, b = 5 and features far from normalised): softplus and
    # sigmoid on both tails, around 0 and beyond the vector exp's clamp at -87, for pairs and negatives
    n = 40
    a = torch.linspace(-3.0, 3.0, n, dtype=torch.float64)
    img = torch.stack([a, torch.ones(n, dtype=torch.float64)], 1)           # <x_i, y_j> = a_i c_j + e_j
    txt = torch.stack([torch.linspace(1.0, -1.0, n, dtype=torch.float64), torch.linspace(-0.5, 0.5, n, dtype=torch.float64)], 1)
    want = loss_and_grads(reference.siglip_loss, img, txt, 100.0, 5.0)
    got = loss_and_grads(_ours(backend, 7 if backend != "torch" else None), img.float(), txt.float(), 100.0, 5.0)
    assert_close(got, want, 1e-5, f"{backend}, logits in [-300, 300]")


@pytest.mark.parametrize("backend, chunk", [pytest.param("cpp", c, marks=needs_cpp) for c in (None, 1, 5)]
                         + [("chunked", None), ("chunked", 5)])
def test_float64_is_exact(backend, chunk):
    img, txt = loss_features(37, 24, dtype=torch.float64)
    want = loss_and_grads(reference.siglip_loss, img, txt, 14.3, -7.0)
    got = loss_and_grads(_ours(backend, chunk), img, txt, 14.3, -7.0)
    assert_close(got, want, 1e-12, f"{backend} float64 chunk={chunk}")


@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_own_error(backend, dtype):
    # half features, fp32 arithmetic: against the float64 loss of the same rounded features, within twice
    # the error of the reference run in `dtype` (the interpreter truncates Triton's fp32 -> bf16 stores of
    # G where a GPU rounds: pessimistic for triton bf16)
    img, txt = loss_features(170, 40, dtype=dtype)
    want = loss_and_grads(reference.siglip_loss, img.double(), txt.double(), 10.0, -10.0)
    own = loss_and_grads(lambda i, t, s, b: reference.siglip_loss(i, t, s.to(dtype), b.to(dtype)), img, txt, 10.0, -10.0)
    got = loss_and_grads(_ours(backend), img, txt, 10.0, -10.0)
    assert_within_twice(got, own, want, f"{backend} {dtype}")


def _autocast_parity(device, dtype, backend, n, d, t, b):
    """Ours on `dtype` features against OpenCLIP's SigLipLoss under torch.autocast(dtype) on the fp32
    features (its mixed-precision training), both measured against float64 on the fp32 features."""
    img, txt = (x.to(device) for x in loss_features(n, d))
    want = [x.cpu() for x in loss_and_grads(reference.siglip_loss, img.double(), txt.double(), t, b)]

    def autocast_siglip(i, tt, s, bb):
        with torch.autocast(device.type, dtype=dtype):
            return _openclip(i, tt, s, bb)

    own = [x.cpu() for x in loss_and_grads(autocast_siglip, img, txt, t, b)]
    fn = lambda i, tt, s, bb: clipforge.siglip_loss(i.to(dtype), tt.to(dtype), s, bb, backend=backend)  # noqa: E731
    got = [x.cpu() for x in loss_and_grads(fn, img, txt, t, b)]
    assert_within_twice(got, own, want, f"{backend} {dtype} vs SigLipLoss under autocast")


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_fp16_matches_openclip_autocast_on_cpu(backend):
    # the CPU (interpreter) twin of test_cuda_matches_openclip_autocast_bf16
    _autocast_parity(torch.device("cpu"), torch.float16, backend, 200, 64, 10.0, -10.0)


@pytest.mark.parametrize("backend", ["triton", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_costs_three_gemm_equivalents_and_one_without_gradients(backend, monkeypatch):
    # loss + gradients = 3 x 2 n m d FLOPs in one pass (the logits, G Y, G^T X: G needs nothing but its
    # own logit, so nothing is recomputed); the value alone = 1. ATen / cuBLAS GEMMs are counted by
    # FlopCounterMode (clipforge._C's through the dispatcher too; in-place addmm_, which it does not
    # know, as 2 m k n), the Triton kernels' tl.dot work as the interpreter executes it (2 M N K per tile
    # dot, padding included).
    from torch.utils.flop_counter import FlopCounterMode

    dots = {"flops": 0}
    if backend == "triton":
        from clipforge.kernels.siglip import _siglip_fwd_kernel

        dots = count_tl_dots(_siglip_fwd_kernel, monkeypatch)
    n, d = 384, 128  # three 128-row blocks, three 128-column tiles, two K steps
    img, txt = loss_features(n, d, dtype=torch.float16 if backend == "triton" else torch.float32)
    gemm = 2 * n * n * d
    addmm_ = {torch.ops.aten.addmm_: lambda c, a, b, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}
    chunk = None if backend == "triton" else 100  # uneven row chunks on the CPU backends
    for with_grads, want in ((True, 3), (False, 1)):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        dots["flops"] = 0
        with FlopCounterMode(display=False, custom_mapping=addmm_) as counter, torch.set_grad_enabled(with_grads):
            loss = clipforge.siglip_loss(i, t, scale, bias, backend=backend, chunk_size=chunk)
            if with_grads:
                loss.backward()
        total = counter.get_total_flops() + dots["flops"]
        assert abs(total / gemm - want) <= 0.05, f"{backend} grads={with_grads}: {total / gemm:.3f} GEMM-equivalents " \
            f"(ATen {counter.get_total_flops() / gemm:.2f}, tl.dot {dots['flops'] / gemm:.2f}), want {want}"
        if backend == "triton":
            assert dots["flops"] == gemm  # the logits, fused with the sums (and G) in Triton
        assert (i.grad is not None) == with_grads


@pytest.mark.parametrize("backend", ["triton", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_backward_scales_the_gradients_computed_in_forward(backend):
    # the gradients come out of the forward pass (for dL_out = 1): the backward multiplies by dL_out and
    # hands them out (a second backward is refused with a sentence), and a no-grad call gives the same value
    img, txt = loss_features(50, 16)
    once = loss_and_grads(_ours(backend), img, txt, 10.0, -10.0)
    thrice = loss_and_grads(lambda *a: 3.0 * _ours(backend)(*a), img, txt, 10.0, -10.0)
    assert_close([x / 3 for x in thrice], once, 1e-6, f"{backend}: 3 x the loss")
    i = img.clone().requires_grad_(True)
    loss = clipforge.siglip_loss(i, txt, 10.0, -10.0, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same loss"):
        loss.backward()
    with torch.no_grad():  # the value-only path: another kernel, the same value
        value = clipforge.siglip_loss(img, txt, 10.0, -10.0, backend=backend).item()
    assert abs(value - once[0].item()) <= 1e-6 * once[0].item()


def test_triton_gradients_keep_input_dtype_and_repeat_bit_equal():
    img, txt = loss_features(33, 16, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        loss = clipforge.siglip_loss(i, t, s, b, backend="triton")
        loss.backward()
        assert i.grad.dtype == t.grad.dtype == torch.bfloat16 and loss.dtype == s.grad.dtype == torch.float32
        runs.append((loss, i.grad, t.grad, s.grad, b.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_cpp
def test_cpp_half_inputs_are_upcast_and_repeat_bit_equal():
    img, txt = loss_features(300, 16, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        b = torch.tensor(-10.0, requires_grad=True)
        loss = clipforge.siglip_loss(i, t, 10.0, b, backend="cpp", chunk_size=64)
        loss.backward()
        assert i.grad.dtype == t.grad.dtype == torch.bfloat16
        runs.append((loss, i.grad, t.grad, b.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = reference.siglip_loss(img.double(), txt.double(), 10.0, -10.0)
    assert abs(runs[0][0].item() - want.item()) <= 1e-5 * abs(want.item())


@needs_cpp
def test_cpp_boundary_checks_and_nan():
    _C = ops.cpp_extension()
    img, txt = loss_features(4, 8)
    cases = [
        (lambda: _C.siglip_forward(img.int(), txt.int(), 1.0, 0.0, 0, 0), "float32 or float64"),
        (lambda: _C.siglip_forward(img, txt.double(), 1.0, 0.0, 0, 0), "same dtype"),
        (lambda: _C.siglip_forward(img[0], txt, 1.0, 0.0, 0, 0), "2-D"),
        (lambda: _C.siglip_forward(img.t().contiguous().t(), txt, 1.0, 0.0, 0, 0), "contiguous"),
        (lambda: _C.siglip_forward(img, txt[:, :7].contiguous(), 1.0, 0.0, 0, 0), "same feature dimension"),
        (lambda: _C.siglip_forward(img, txt, float("nan"), 0.0, 0, 0), "finite"),
        (lambda: _C.siglip_forward(img, txt, 1.0, float("inf"), 0, 0), "finite"),
        (lambda: _C.siglip_forward(img, txt, 1.0, 0.0, 1, 0), "must pair with text rows"),
        (lambda: _C.siglip_forward(img, txt, 1.0, 0.0, 0, -1), "chunk_size"),
        (lambda: _C.siglip_forward_backward(img, txt, 1.0, 0.0, 0, float("nan"), 0), "coef must be finite"),
        (lambda: _C.siglip_forward_backward(img, txt, 1.0, 0.0, 2, 0.5, 0), "must pair with text rows"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    bad = img.clone()
    bad[2, 3] = float("nan")
    assert torch.isnan(_C.siglip_forward(bad, txt, 10.0, -10.0, 0, 0))
    outputs = _C.siglip_forward_backward(bad, txt, 10.0, -10.0, 0, 0.25, 0)
    assert all(torch.isnan(x).any() for x in outputs)


@pytest.mark.parametrize("backend", ["torch", "triton", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_loss_and_grads_equals_autograd(backend):
    img, txt = loss_features(70, 24)
    want = loss_and_grads(_ours(backend), img, txt, 10.0, -10.0)
    got = siglip_loss_and_grads(img, txt, torch.tensor(10.0), torch.tensor(-10.0), backend=backend)
    assert got[3].shape == got[4].shape == () and got[1].dtype == torch.float32 and got[4].dtype == torch.float32
    assert_close([x.double() for x in got], want, 1e-6, f"{backend}: loss_and_grads vs autograd")


@pytest.mark.parametrize("backend", ["torch", "triton", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs_raise_clear_errors(backend):
    img, txt = loss_features(8, 16)
    with pytest.raises(ValueError, match="same shape"):
        clipforge.siglip_loss(img, txt[:7], 1.0, 0.0, backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        clipforge.siglip_loss(img[:0], txt[:0], 1.0, 0.0, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        clipforge.siglip_loss(img, txt, 1.0, 0.0, backend=backend, chunk_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        clipforge.siglip_loss(img, txt, 1.0, 0.0, backend="cuda")


def test_module_float_scale_and_bias_get_no_gradient():
    img, txt = loss_features(50, 16)
    i = img.clone().requires_grad_(True)
    loss = SigLipLoss(backend="chunked")(i, txt, 20.0, -5.0)
    want = _openclip(img, txt, torch.tensor(20.0), torch.tensor(-5.0))
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
    loss.backward()
    assert i.grad is not None and i.grad.shape == img.shape


def test_routing_by_capability_and_dtype(monkeypatch):
    # the softmax loss's table (engine/ops.py), through the same rule
    monkeypatch.delenv("CLIPFORGE_BACKEND_SIGLIP_LOSS", raising=False)
    cuda = torch.device("cuda")
    table = {
        ((9, 0), torch.bfloat16): "triton", ((9, 0), torch.float16): "triton", ((8, 0), torch.bfloat16): "triton",
        ((9, 0), torch.float32): "chunked", ((8, 0), torch.float32): "chunked",  # no exact-fp32 Triton dots
        ((9, 0), torch.float64): "chunked", ((7, 0), torch.float16): "chunked", ((7, 5), torch.float16): "chunked",
    }
    for (cap, dtype), expected in table.items():
        monkeypatch.setattr(ops, "_cuda_capability", lambda device, cap=cap: cap)
        assert ops.select_siglip_backend(cuda, dtype=dtype) == expected, (cap, dtype)
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (9, 0))
    assert ops.select_siglip_backend(cuda, "triton", dtype=torch.float32) == "triton"
    with pytest.raises(ValueError, match="Triton SigLIP loss never takes float64.*'chunked'"):
        ops.select_siglip_backend(cuda, "triton", dtype=torch.float64)
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (7, 0))
    with pytest.raises(ValueError, match="compute capability 8.0 or newer.*sm70.*backend='chunked'"):
        ops.select_siglip_backend(cuda, "triton", dtype=torch.float16)
    cpu = torch.device("cpu")

    class Stale:  # an extension built before the sigmoid loss existed
        pass

    class Current:
        siglip_forward = siglip_forward_backward = None

    monkeypatch.setattr(ops, "cpp_extension", lambda: Current())
    assert ops.select_siglip_backend(cpu, dtype=torch.float32) == "cpp"
    monkeypatch.setattr(ops, "cpp_extension", lambda: Stale())
    monkeypatch.setattr(ops, "_warned_stale", set())
    with pytest.warns(RuntimeWarning, match="no siglip_forward"):
        assert ops.select_siglip_backend(cpu, dtype=torch.float32) == "chunked"
    with pytest.raises(RuntimeError, match="'cpp' SigLIP loss backend needs clipforge._C"):
        ops.select_siglip_backend(cpu, "cpp")
    monkeypatch.setattr(ops, "cpp_extension", lambda: None)
    assert ops.select_siglip_backend(cpu, dtype=torch.bfloat16) == "chunked"
    monkeypatch.setenv("CLIPFORGE_BACKEND_SIGLIP_LOSS", "torch")
    assert ops.select_siglip_backend(cpu) == "torch"
    assert ops.select_siglip_backend(cpu, "chunked") == "chunked"  # an explicit argument wins


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_cuda_matches_openclip_autocast_bf16(backend):
    _autocast_parity(torch.device("cuda"), torch.bfloat16, backend, 4099, 768, 10.0, -10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d, tb", [(1000, 512, (100.0, -20.0)), (4099, 768, (10.0, -10.0))])
def test_cuda_matches_float64(backend, n, d, tb, dtype):
    # GPU twin of the interpreter tests: fp32 to 1e-5 (chunked: cuBLAS fp32; triton, forced: 3xTF32),
    # half precision to twice PyTorch's own error in that dtype
    img, txt = (x.cuda() for x in loss_features(n, d, dtype=dtype))
    want = [x.cpu() for x in loss_and_grads(reference.siglip_loss, img.double(), txt.double(), *tb)]
    got = [x.cpu() for x in loss_and_grads(_ours(backend), img, txt, *tb)]
    if dtype == torch.float32:
        assert_close(got, want, 1e-5, f"{backend} cuda n={n} d={d}")
        return
    own = [x.cpu() for x in loss_and_grads(
        lambda i, t, s, b: reference.siglip_loss(i, t, s.to(dtype), b.to(dtype)), img, txt, *tb)]
    assert_within_twice(got, own, want, f"{backend} cuda {dtype}")
