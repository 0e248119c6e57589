"""clipforge.contrastive_loss against OpenCLIP's ClipLoss (value and gradients), per backend.

fp32 relative error <= 1e-5 (norm-wise, on the loss and on every gradient). Every value of every axis is
covered: N {1, 2, 7, 17, 64, 129, 300, 1000}, d {8, 16, 64, 200, 512}, chunk {1, 8, 64, uneven},
scale {1, 14.3, 100}; the full product on small N (d = 16), a few large cases otherwise. Triton runs
under the interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU tensors: the same kernels and
the same row-chunked driver (engine/loss.py) as on a GPU, with CPU GEMMs in place of cuBLAS.
Also here: half precision against twice PyTorch's own error (and OpenCLIP's under autocast), the
GPU algorithm's FLOP count (four GEMM-equivalents), and the backend routing of clipforge.ops.
"""
import math

import pytest
import torch

import clipforge
from clipforge import ops, reference
from clipforge.loss import ContrastiveLoss
from conftest import assert_close, assert_within_twice, count_tl_dots, loss_and_grads, loss_features

open_clip = pytest.importorskip("open_clip")

HAS_CPP = ops.cpp_extension() is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="clipforge._C is not built")
SMALL_N = (1, 2, 7, 64, 129)
SCALES = (1.0, 14.3, 100.0)


def _assert_close(got, want, rtol, what, floor=1e-6):
    """conftest.assert_close with reference norms below `floor` compared absolutely: N = 1, where loss and
    gradients are exactly 0, sums of O(scale) terms (see _floor)."""
    assert_close(got, want, rtol, what, floor)


def _floor(n, scale):
    return scale if n == 1 else 1e-6


def _clip_loss(img, txt, s):
    return open_clip.loss.ClipLoss()(img, txt, s)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", SMALL_N)
@pytest.mark.parametrize("backend", ["torch", "triton", "chunked"])  # triton: under the interpreter (conftest.py)
def test_backend_matches_openclip(backend, n, scale):
    img, txt = loss_features(n, 16)
    want = loss_and_grads(_clip_loss, img, txt, scale)
    got = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, scale)
    _assert_close(got, want, 1e-5, f"{backend} n={n} scale={scale}", _floor(n, scale))


@needs_cpp
@pytest.mark.parametrize("chunk", (1, 8, 64, 5))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", SMALL_N)
def test_cpp_backend_matches_openclip_small(n, scale, chunk):
    img, txt = loss_features(n, 16)
    want = loss_and_grads(_clip_loss, img, txt, scale)
    got = loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="cpp", chunk_size=chunk), img, txt, scale)
    _assert_close(got, want, 1e-5, f"cpp n={n} scale={scale} chunk={chunk}", _floor(n, scale))


@needs_cpp
@pytest.mark.parametrize(
    "n, d, chunk, scale",
    [(1000, 512, 64, 100.0), (1000, 512, 333, 14.3), (1000, 16, None, 1.0), (129, 512, 8, 100.0), (7, 512, 1, 14.3)],
)
def test_cpp_backend_matches_openclip_large(n, d, chunk, scale):
    img, txt = loss_features(n, d)
    want = loss_and_grads(_clip_loss, img, txt, scale)
    got = loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="cpp", chunk_size=chunk), img, txt, scale)
    _assert_close(got, want, 1e-5, f"cpp n={n} d={d} scale={scale} chunk={chunk}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_large_batch_torch_and_cpp_against_float64(backend):
    # N = 1000, d = 512 against the float64 truth (ClipLoss in fp32 has its own error)
    img, txt = loss_features(1000, 512, seed=3)
    want = loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 100.0)
    got = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, 100.0)
    _assert_close(got, want, 1e-5, f"{backend} vs float64")


@pytest.mark.parametrize("backend, chunk", [pytest.param("cpp", c, marks=needs_cpp) for c in (1, 8, 5)]
                         + [("chunked", None), ("chunked", 5)])
def test_float64_is_exact(backend, chunk):
    img, txt = loss_features(37, 24, dtype=torch.float64)
    want = loss_and_grads(reference.contrastive_loss, img, txt, 14.3)
    got = loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend, chunk_size=chunk), img, txt, 14.3)
    _assert_close(got, want, 1e-12, f"{backend} float64 chunk={chunk}")


def _uneven(n):
    return max(1, n // 3 + 1)  # 3 chunks, the last one shorter (and, for n = 1000, not whole 128-row blocks)


@pytest.mark.parametrize("chunk", ["auto", "uneven"])
@pytest.mark.parametrize("d", [8, 64, 200])
@pytest.mark.parametrize("n", [1, 17, 300, 1000])
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_row_chunked_backends_match_openclip_and_float64(backend, n, d, chunk):
    # the GPU algorithm (fused forward statistics over split columns, probabilities per row chunk, two
    # GEMMs per chunk) on odd shapes: 300 / 1000 rows are several 128-row blocks and, with 4 "SMs" under
    # the interpreter, several column splits; d = 200 is not a multiple of BLOCK_K (masked K loop)
    img, txt = loss_features(n, d)
    chunk_size = None if chunk == "auto" else _uneven(n)
    fn = lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend, chunk_size=chunk_size)  # noqa: E731
    got = loss_and_grads(fn, img, txt, 14.3)
    _assert_close(got, loss_and_grads(_clip_loss, img, txt, 14.3), 1e-5, f"{backend} vs ClipLoss", _floor(n, 14.3))
    want = loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 14.3)
    _assert_close(got, want, 1e-5, f"{backend} vs float64", _floor(n, 14.3))


def test_triton_forward_in_row_chunks(monkeypatch):
    # the forward launches in row chunks when the column partials would pass their bound: force
    # 128-row launches (3 for 300 rows, the last partial) and merge them
    from clipforge.kernels import contrastive as kernel

    monkeypatch.setattr(kernel, "WORK_BYTES", 1)
    img, txt = loss_features(300, 40)
    got = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="triton"), img, txt, 14.3)
    _assert_close(got, loss_and_grads(_clip_loss, img, txt, 14.3), 1e-5, "triton, 128-row forward launches")


def test_triton_interpreter_d512_multi_block():
    # d = 512: a K loop of 8 steps; 170 rows: 2 row blocks, the second partial
    img, txt = loss_features(170, 512)
    want = loss_and_grads(_clip_loss, img, txt, 14.3)
    got = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="triton"), img, txt, 14.3)
    _assert_close(got, want, 1e-5, "triton d=512")


@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_own_error(backend, dtype):
    # half features, fp32 statistics: compare with the float64 loss of the same (rounded) features.
    # Tolerance: twice PyTorch's own error in that dtype (the reference run in `dtype` on CPU). (The
    # interpreter truncates Triton's fp32 -> bf16 stores where a GPU rounds: pessimistic for triton bf16.)
    img, txt = loss_features(170, 40, dtype=dtype)
    want = loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 14.3)
    torch_half = loss_and_grads(lambda i, t, s: reference.contrastive_loss(i, t, s.to(dtype)), img, txt, 14.3)
    got = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, 14.3)
    assert_within_twice(got, torch_half, want, f"{backend} {dtype}")
    assert got[1].dtype == torch.float64  # (converted by the helper; the raw gradients keep the input dtype)


def _autocast_parity(device, dtype, backend, n, d, scale):
    """Ours on `dtype` features (what the trainer hands the loss under precision.dtype) against
    OpenCLIP's ClipLoss under torch.autocast(dtype) on the fp32 features (its mixed-precision
    training), both measured against float64 on the fp32 features."""
    img, txt = (x.to(device) for x in loss_features(n, d))
    want = [x.cpu() for x in loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), scale)]

    def autocast_clip(i, t, s):
        with torch.autocast(device.type, dtype=dtype):
            return _clip_loss(i, t, s)

    own = [x.cpu() for x in loss_and_grads(autocast_clip, img, txt, scale)]
    fn = lambda i, t, s: clipforge.contrastive_loss(i.to(dtype), t.to(dtype), s, backend=backend)  # noqa: E731
    got = [x.cpu() for x in loss_and_grads(fn, img, txt, scale)]
    assert_within_twice(got, own, want, f"{backend} {dtype} vs ClipLoss under autocast")


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_fp16_matches_openclip_autocast_on_cpu(backend):
    # the CPU twin of test_triton_cuda_matches_openclip_autocast_bf16 (interpreter fp16; CPU autocast)
    _autocast_parity(torch.device("cpu"), torch.float16, backend, 300, 64, 100.0)


@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("d", [512, 768])
def test_gpu_algorithm_costs_four_gemm_equivalents(backend, d, monkeypatch):
    # forward + backward = 4 x 2 n m d FLOPs: the logits once for the statistics, once recomputed for
    # the probabilities, then G T and G^T I. cuBLAS / ATen GEMMs are counted by torch's FlopCounterMode;
    # the Triton kernels' tl.dot work is counted as the interpreter executes it (2 M N K per tile dot,
    # padding included), which is the kernels' tile loops as launched.
    from torch.utils.flop_counter import FlopCounterMode

    dots = {"flops": 0}
    if backend == "triton":
        from clipforge.kernels.contrastive import _contrastive_fwd_kernel

        dots = count_tl_dots(_contrastive_fwd_kernel, monkeypatch)
    n = 384  # three 128-row blocks, three 128-column tiles
    img, txt = loss_features(n, d, dtype=torch.float16)
    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    s = torch.tensor(14.3, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        clipforge.contrastive_loss(i, t, s, backend=backend).backward()
    gemm = 2 * n * n * d
    total = counter.get_total_flops() + dots["flops"]
    assert abs(total / gemm - 4) <= 0.2, f"{backend} d={d}: {total / gemm:.3f} GEMM-equivalents (cuBLAS/ATen " \
        f"{counter.get_total_flops() / gemm:.2f}, tl.dot {dots['flops'] / gemm:.2f})"
    if backend == "triton":
        assert dots["flops"] == 2 * gemm  # forward statistics + the recompute, both fused in Triton


def test_triton_gradients_keep_input_dtype_and_repeat_bit_equal():
    img, txt = loss_features(33, 16, dtype=torch.bfloat16)
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
    img, txt = loss_features(20, 16, dtype=torch.bfloat16)
    i = img.clone().requires_grad_(True)
    t = txt.clone().requires_grad_(True)
    loss = clipforge.contrastive_loss(i, t, 14.3, backend="cpp")
    loss.backward()
    assert i.grad.dtype == torch.bfloat16 and t.grad.dtype == torch.bfloat16
    want = reference.contrastive_loss(img.double(), txt.double(), 14.3)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())


@needs_cpp
def test_module_float_scale_and_auto_backend():
    img, txt = loss_features(50, 16)
    loss_fn = ContrastiveLoss()
    want = _clip_loss(img, txt, torch.tensor(20.0))
    got = loss_fn(img, txt, 20.0)  # a float scale: no gradient for it, same value
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)
    assert ops.select_contrastive_backend(img.device) == "cpp"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp), "triton", "chunked"])
def test_bad_inputs_raise_clear_errors(backend):
    img, txt = loss_features(8, 16)
    with pytest.raises(ValueError, match="same shape"):
        clipforge.contrastive_loss(img, txt[:7], 1.0, backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        clipforge.contrastive_loss(img[:0], txt[:0], 1.0, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        clipforge.contrastive_loss(img, txt, 1.0, backend=backend, chunk_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        clipforge.contrastive_loss(img, txt, 1.0, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_loss_and_grads_equals_autograd(backend):
    from clipforge.loss import contrastive_loss_and_grads

    img, txt = loss_features(70, 24)
    want = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, 14.3)
    got = contrastive_loss_and_grads(img, txt, torch.tensor(14.3), backend=backend)
    assert got[3].shape == () and got[1].dtype == torch.float32
    _assert_close([x.double() for x in got], want, 1e-6, f"{backend}: loss_and_grads vs autograd")


def test_loss_and_grads_keeps_half_feature_gradients_out_of_fp16_subnormals():
    # what gradient caching stores: at N = 8192 and scale 1 the gradient elements (~6e-5 at most) are
    # where fp16 has lost its precision; in fp32 they keep the error of the fp16 features themselves
    from clipforge.loss import contrastive_loss_and_grads

    img, txt = loss_features(8192, 64, dtype=torch.float64)
    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    reference.contrastive_loss(i, t, 1.0).backward()
    _, g_img, _, _ = contrastive_loss_and_grads(img.half(), txt.half(), 1.0, backend="chunked")
    half = img.half().requires_grad_(True)
    clipforge.contrastive_loss(half, txt.half(), 1.0, backend="chunked").backward()
    err32 = ((g_img.double() - i.grad).norm() / i.grad.norm()).item()
    err16 = ((half.grad.double() - i.grad).norm() / i.grad.norm()).item()
    assert g_img.dtype == torch.float32 and err32 <= 5e-4 and err16 >= 2 * err32, (err32, err16)


def test_routing_by_capability_and_dtype(monkeypatch):
    monkeypatch.delenv("CLIPFORGE_BACKEND_CONTRASTIVE_LOSS", raising=False)
    cuda = torch.device("cuda")
    table = {  # (capability, dtype) -> backend: engine/ops.py's table
        ((9, 0), torch.bfloat16): "triton", ((9, 0), torch.float16): "triton",
        ((8, 0), torch.bfloat16): "triton", ((8, 0), torch.float16): "triton",
        ((9, 0), torch.float32): "chunked", ((8, 0), torch.float32): "chunked",  # no exact-fp32 Triton dots
        ((9, 0), torch.float64): "chunked", ((8, 0), torch.float64): "chunked",
        ((7, 0), torch.float16): "chunked", ((7, 0), torch.float32): "chunked",  # V100: no Triton tensor cores
        ((7, 5), torch.float16): "chunked",
    }
    for (cap, dtype), expected in table.items():
        monkeypatch.setattr(ops, "_cuda_capability", lambda device, cap=cap: cap)
        assert ops.select_contrastive_backend(cuda, dtype=dtype) == expected, (cap, dtype)
    # forced: fp32 runs on Triton (3xTF32 dots) on sm80+; float64 and sm70 are refused with the way out
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (9, 0))
    assert ops.select_contrastive_backend(cuda, "triton", dtype=torch.float32) == "triton"
    with pytest.raises(ValueError, match="never takes float64.*'chunked'"):
        ops.select_contrastive_backend(cuda, "triton", dtype=torch.float64)
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (7, 0))
    with pytest.raises(ValueError, match="compute capability 8.0 or newer.*sm70.*backend='chunked'"):
        ops.select_contrastive_backend(cuda, "triton", dtype=torch.float16)
    assert ops.select_contrastive_backend(cuda, "chunked", dtype=torch.float16) == "chunked"
    # CPU: the C++ extension when built, else the chunked PyTorch backend (never the N x N reference)
    cpu = torch.device("cpu")
    monkeypatch.setattr(ops, "cpp_extension", lambda: object())
    assert ops.select_contrastive_backend(cpu, dtype=torch.float32) == "cpp"
    monkeypatch.setattr(ops, "cpp_extension", lambda: None)
    assert ops.select_contrastive_backend(cpu, dtype=torch.bfloat16) == "chunked"
    monkeypatch.setenv("CLIPFORGE_BACKEND_CONTRASTIVE_LOSS", "torch")
    assert ops.select_contrastive_backend(cpu) == "torch"


def test_work_buffer_is_bounded():
    from clipforge import loss

    # 32k gathered columns in bf16: 4096 local rows fit one chunk of P (256 MiB); 32768 rows take
    # 8 chunks of 4096; 256k columns would allow 512 rows, below the floor that amortises the per-chunk
    # (m, d) sums
    assert loss._rows_per_chunk(4096, 32768, 32768 * 2, None) == 4096
    assert loss._rows_per_chunk(32768, 32768, 32768 * 2, None) == 4096
    assert loss._rows_per_chunk(300, 32768, 32768 * 2, 7) == 7  # chunk_size wins
    rows = loss._rows_per_chunk(8192, 262144, 262144 * 2, None)
    assert rows == loss.MIN_ROWS and rows % 128 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_backward_accumulates_text_gradient_over_chunks(dtype):
    # several chunks: fp32 operands accumulate with addmm_, half ones through the fp32 product buffer;
    # both must equal the one-chunk result
    img, txt = loss_features(300, 24, dtype=dtype)
    one = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="chunked", chunk_size=300),
                          img, txt, 14.3)
    many = loss_and_grads(lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend="chunked", chunk_size=64),
                           img, txt, 14.3)
    _assert_close(many, one, 1e-5 if dtype == torch.float32 else 2e-3, f"chunked {dtype}: 5 chunks vs 1")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("n, d", [(1000, 512), (4099, 768)])
def test_triton_cuda_matches_openclip_autocast_bf16(backend, n, d):
    # bf16 features (the trainer's under precision.dtype: bf16) against ClipLoss under bf16 autocast
    _autocast_parity(torch.device("cuda"), torch.bfloat16, backend, n, d, 100.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d", [(1000, 512), (4099, 768)])
def test_cuda_matches_float64(backend, n, d, dtype):
    # GPU twin of the interpreter tests: fp32 to 1e-5 (chunked: cuBLAS fp32; triton, forced: 3xTF32),
    # half precision to twice PyTorch's own error in that dtype (the reference computed in `dtype`)
    img, txt = loss_features(n, d, dtype=dtype)
    img, txt = img.cuda(), txt.cuda()
    want = [x.cpu() for x in loss_and_grads(reference.contrastive_loss, img.double(), txt.double(), 100.0)]
    got = [x.cpu() for x in loss_and_grads(
        lambda i, t, s: clipforge.contrastive_loss(i, t, s, backend=backend), img, txt, 100.0)]
    if dtype == torch.float32:
        _assert_close(got, want, 1e-5, f"{backend} cuda n={n} d={d}")
        return
    own = [x.cpu() for x in loss_and_grads(lambda i, t, s: reference.contrastive_loss(i, t, s.to(dtype)),
                                            img, txt, 100.0)]
    assert_within_twice(got, own, want, f"{backend} cuda {dtype}")


@pytest.mark.cuda
def test_cuda_auto_routes_half_to_triton_and_fp32_to_chunked():
    dev = torch.device("cuda")
    assert ops.select_contrastive_backend(dev, dtype=torch.bfloat16) == (
        "triton" if torch.cuda.get_device_capability() >= (8, 0) else "chunked")
    assert ops.select_contrastive_backend(dev, dtype=torch.float32) == "chunked"
