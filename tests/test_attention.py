"""Fused Triton attention (`clipforge.kernels.attention`) and the attention switch in `clipforge.ops`.

Without a GPU the kernels run through the Triton interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before any test module imports triton. They are checked in fp32 against the float64
reference (`clipforge.reference.attention`). On a GPU the same tests run on CUDA tensors, and the
`cuda`-marked ones check fp16 / bf16 against twice PyTorch's own error in that dtype.

Relative error = max|ours - ref| / max|ref|. The gradients of q and k use max(max|ref|, max|dV_ref|) as
the scale: with one key (seq 1) the softmax is constant, their true value is exactly 0 and only
rounding (~1e-7 of the gradient scale) remains.
"""
import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge import ops, reference

attn_mod = pytest.importorskip("clipforge.kernels.attention", reason="triton is not installed")
from clipforge.kernels.utils import TileConfig, attention_tiles, check_kernel_device, is_interpreted  # noqa: E402

kernels = importlib.import_module("clipforge.kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runnable = pytest.mark.skipif(
    DEVICE == "cpu" and not is_interpreted(attn_mod._attention_fwd_kernel),
    reason="no GPU, and triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it "
    "without a GPU), so the Triton kernels cannot run on CPU in this process",
)
FP32_TOL = 1e-5


def _rel_error(ours, ref, scale=None):
    denom = ref.abs().max().item()
    if scale is not None:
        denom = max(denom, scale)
    return (ours.double() - ref.double()).abs().max().item() / denom


def _assert_rel(name, ours, ref, tol, scale=None):
    err = _rel_error(ours, ref, scale)
    if not err <= tol:  # also catches NaN
        diff = (ours.double() - ref.double()).abs()
        idx = torch.nonzero(diff > tol * max(ref.abs().max().item(), scale or 0.0))[:8].tolist()
        rows = "\n".join(f"  {tuple(i)}: ours {ours[tuple(i)].item():+.8g} ref {ref[tuple(i)].item():+.8g}" for i in idx)
        pytest.fail(f"{name}: relative error {err:.3g} > {tol:.1g}; first mismatches:\n{rows}")


def _qkv(batch, heads, seq_q, head_dim, dtype=torch.float32, seq_k=None, layout="packed", seed=0):
    """q, k, v leaves. "packed": views of one (B, S, 3, H, d) projection, as the model makes them
    (non-contiguous, strides (S*3*H*d, d, 3*H*d, 1)); "contiguous"; "transposed": last-dim stride != 1."""
    g = torch.Generator().manual_seed(seed)
    seq_k = seq_q if seq_k is None else seq_k
    if layout == "packed" and seq_k == seq_q:
        qkv = torch.randn(batch, seq_q, 3, heads, head_dim, generator=g).to(DEVICE, dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, d)
        return [t.requires_grad_() for t in (q, k, v)]
    shapes = [(batch, heads, seq_q, head_dim), (batch, heads, seq_k, head_dim), (batch, heads, seq_k, head_dim)]
    if layout == "transposed":
        return [torch.randn(s[:2] + s[3:] + s[2:3], generator=g).to(DEVICE, dtype).transpose(-1, -2).requires_grad_()
                for s in shapes]
    return [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for s in shapes]


def _reference_f64(q, k, v, do, causal, softmax_scale=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.attention(q64, k64, v64, causal=causal, softmax_scale=softmax_scale)
    out.backward(do.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _check_against_float64(q, k, v, causal, softmax_scale=None, tol=FP32_TOL, fn=None):
    fn = fn or kernels.attention
    out = fn(q, k, v, causal=causal, softmax_scale=softmax_scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(do)
    ref_o, ref_dq, ref_dk, ref_dv = _reference_f64(q, k, v, do, causal, softmax_scale)
    scale = ref_dv.abs().max().item()
    _assert_rel("out", out, ref_o, tol)
    _assert_rel("dq", q.grad, ref_dq, tol, scale)
    _assert_rel("dk", k.grad, ref_dk, tol, scale)
    _assert_rel("dv", v.grad, ref_dv, tol)


# ----------------------------------------------------------------------------- fp32 vs float64
# (batch, heads, seq, head_dim, causal): one token, a tail smaller than any block, ViT-B/32's 50,
# the causal text length 77, and ViT-B/16's 197 (several blocks with an uneven last one).
SHAPES = [
    (2, 3, 1, 32, False),
    (2, 3, 1, 64, True),
    (2, 3, 17, 32, False),
    (2, 3, 17, 64, True),
    (2, 2, 50, 32, False),
    (2, 2, 50, 64, False),
    (2, 2, 77, 32, True),
    (2, 2, 77, 64, True),
    (1, 2, 197, 32, False),
    (1, 2, 197, 64, True),
]


@runnable
@pytest.mark.parametrize("batch,heads,seq,head_dim,causal", SHAPES)
def test_matches_float64_reference(batch, heads, seq, head_dim, causal):
    _check_against_float64(*_qkv(batch, heads, seq, head_dim), causal)


@runnable
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_any_strides(layout):
    _check_against_float64(*_qkv(2, 2, 33, 32, layout=layout), causal=True)


@runnable
@pytest.mark.parametrize("seq", [50, 197], ids=["fused-bwd", "split-bwd"])
def test_expanded_output_gradient(seq):
    # out.sum().backward() hands the backward a dO whose strides are all 0
    q, k, v = _qkv(1, 2, seq, 32)
    kernels.attention(q, k, v).sum().backward()
    _, ref_dq, ref_dk, ref_dv = _reference_f64(q, k, v, torch.ones(q.shape, device=DEVICE), False)
    scale = ref_dv.abs().max().item()
    _assert_rel("dq", q.grad, ref_dq, FP32_TOL, scale)
    _assert_rel("dk", k.grad, ref_dk, FP32_TOL, scale)
    _assert_rel("dv", v.grad, ref_dv, FP32_TOL)


@runnable
@pytest.mark.parametrize(
    "tiles",
    [TileConfig(16, 32), TileConfig(32, 16), TileConfig(16, 16)],
    ids=["m16-n32", "m32-n16", "m16-n16"],
)
@pytest.mark.parametrize("seq,causal", [(77, True), (50, False)])
def test_small_tiles(monkeypatch, tiles, seq, causal):
    # many blocks, BLOCK_M != BLOCK_N, and the split backward (dK/dV + dQ kernels) instead of the fused
    # one: exercises the causal loop bounds (diagonal tiles, the dK/dV start tile) that the heuristic's
    # large tiles cover in one step at these lengths
    monkeypatch.setattr(attn_mod, "attention_tiles", lambda kind, *args: None if kind == "bwd_fused" else tiles)
    _check_against_float64(*_qkv(1, 2, seq, 32), causal)


@runnable
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
def test_routing_of_each_architecture(monkeypatch, capability):
    # 77 tokens: the split backward with the heuristic's sm80 tiles, the fused one on sm90
    monkeypatch.setattr(attn_mod, "cuda_capability", lambda device: capability)
    _check_against_float64(*_qkv(1, 2, 77, 64), causal=True)


@runnable
def test_head_dim_not_power_of_two():
    _check_against_float64(*_qkv(1, 2, 29, 40), causal=True)


@runnable
@pytest.mark.parametrize("seq_q,seq_k", [(1, 50), (17, 50), (50, 17)], ids=["attnpool", "short-q", "short-k"])
def test_cross_attention_lengths(seq_q, seq_k):
    # the ResNet attention pool attends one query to the whole grid
    _check_against_float64(*_qkv(2, 2, seq_q, 32, seq_k=seq_k, layout="contiguous"), causal=False)


@runnable
def test_softmax_scale():
    _check_against_float64(*_qkv(1, 2, 21, 32), causal=True, softmax_scale=0.37)


@runnable
def test_repeat_is_bit_equal():
    q, k, v = _qkv(2, 2, 77, 64)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        out = kernels.attention(q, k, v, causal=True)
        out.backward(do)
        results.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        assert torch.equal(a, b), f"{name} differs between two identical calls (max diff {(a - b).abs().max().item():.3g})"


@runnable
def test_output_layout_makes_the_model_reshape_free():
    q, k, v = _qkv(2, 3, 9, 32)
    out = kernels.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


# ----------------------------------------------------------------------------- low precision
@contextlib.contextmanager
def _math_sdpa_in_low_precision():
    """SDPA's math backend, computing in the input dtype (PyTorch upcasts its reductions by default)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def _check_low_precision(batch, heads, seq, head_dim, causal, dtype):
    """FlashAttention's criterion: our error against the fp32 reference is at most twice PyTorch's
    own error (SDPA math in `dtype`) against the same reference, for the output and every gradient."""
    q, k, v = _qkv(batch, heads, seq, head_dim, dtype=dtype)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)

    def run(fn, inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*inputs)
        out.backward(do.to(out.dtype))
        return [out.detach()] + [t.grad for t in inputs]

    ref = run(lambda *t: reference.attention(*t, causal=causal), [t.float() for t in (q, k, v)])
    ours = run(lambda *t: kernels.attention(*t, causal=causal), (q, k, v))
    with _math_sdpa_in_low_precision():
        torch_low = run(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), (q, k, v))
    for name, a, b, r in zip(["out", "dq", "dk", "dv"], ours, torch_low, ref):
        ours_err = (a.float() - r).abs().max().item()
        torch_err = (b.float() - r).abs().max().item()
        # plus, as FlashAttention's tests do, twice the error of merely storing the reference in `dtype`
        atol = 2 * (r.to(dtype).float() - r).abs().max().item()
        assert math.isfinite(ours_err) and ours_err <= 2 * torch_err + atol, (
            f"{name} ({dtype}, seq {seq}, head_dim {head_dim}, causal {causal}): max error {ours_err:.3g} "
            f"vs PyTorch's own {torch_err:.3g} (limit: twice, + {atol:.2g} for rounding to {dtype})"
        )


@runnable
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_interpreter_twin(dtype):
    # the cuda test below at a CI-sized shape; under the interpreter tiles are upcast to fp32 after
    # tl.load (the interpreter gets bf16 wrong), so this checks the loads, stores and dtype plumbing
    _check_low_precision(2, 2, 50, 32, False, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq,causal", [(50, False), (77, True), (197, False), (257, False), (577, False)])
def test_low_precision_on_gpu(seq, causal, head_dim, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _check_low_precision(4, 3, seq, head_dim, causal, dtype)


@pytest.mark.cuda
def test_gpu_repeat_is_bit_equal_bf16():
    q, k, v = _qkv(8, 12, 197, 64, dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        out = kernels.attention(q, k, v)
        out.backward(torch.ones_like(out))
        outs.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


# ----------------------------------------------------------------------------- argument checks
def test_rejects_bad_arguments():
    q = torch.zeros(1, 2, 8, 32)
    with pytest.raises(ValueError, match="as many queries as keys"):
        kernels.attention(q, torch.zeros(1, 2, 9, 32), torch.zeros(1, 2, 9, 32), causal=True)
    with pytest.raises(ValueError, match="head_dim up to 128"):
        big = torch.zeros(1, 1, 4, 256)
        kernels.attention(big, big, big)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.attention(q, q.double(), q)
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
        kernels.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="sharing batch"):
        kernels.attention(q, torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))


def test_device_check_names_the_fix():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_kernel_device(object(), torch.zeros(1), "attention")  # a kernel compiled for the GPU


def test_tile_heuristic():
    # short CLIP sequences take the whole K/V in one tile and need no pipelining
    for seq in (50, 77):
        t = attention_tiles("fwd", 64, seq, seq)
        assert t.block_n >= seq and t.num_stages == 1
    for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
        for head_dim in (32, 64, 128):
            for seq in (1, 50, 77, 197, 257, 577):
                t = attention_tiles(kind, head_dim, seq, seq)
                assert t.block_m >= 16 and t.block_n >= 16 and t.num_warps in (4, 8)
    # the single-kernel backward takes CLIP's short sequences, the split one the image towers' lengths;
    # 77 tokens only from sm90 on (its 128 x 128 tiles spill on sm80)
    for cap in [(8, 0), (9, 0), None]:
        assert attention_tiles("bwd_fused", 64, 50, 50, cap) is not None
        assert attention_tiles("bwd_fused", 128, 50, 50, cap) is not None
        assert attention_tiles("bwd_fused", 64, 197, 197, cap) is None
        assert attention_tiles("bwd_fused", 128, 77, 77, cap) is None
    assert attention_tiles("bwd_fused", 64, 77, 77, (9, 0)) is not None
    assert attention_tiles("bwd_fused", 64, 77, 77, (8, 0)) is None
    # fp32 on a GPU (forced only): small tiles, no fused backward (compile_gate.py: no spills, <= 52 KiB);
    # the interpreter (capability None) keeps the regular tiles
    for cap in [(8, 0), (9, 0)]:
        for head_dim in (64, 128):
            assert attention_tiles("bwd_fused", head_dim, 50, 50, cap, fp32=True) is None
            for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
                t = attention_tiles(kind, head_dim, 197, 197, cap, fp32=True)
                assert t.block_m <= 32 and t.block_n <= 32 and t.num_warps == 4
    assert attention_tiles("fwd", 64, 197, 197, None, fp32=True) == attention_tiles("fwd", 64, 197, 197)


def test_fused_backward_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CLIPFORGE_ATTENTION_FUSED_BWD", "0")
    assert attention_tiles("bwd_fused", 64, 50, 50) is None
    with pytest.raises(ValueError, match="unknown attention kernel kind"):
        attention_tiles("fwd2", 64, 50, 50)


# ----------------------------------------------------------------------------- ops switch
def test_switch_on_cpu(monkeypatch):
    monkeypatch.delenv("CLIPFORGE_BACKEND_ATTENTION", raising=False)
    cpu = torch.device("cpu")
    assert ops.select_attention_backend(cpu) == "sdpa"
    monkeypatch.setenv("CLIPFORGE_BACKEND_ATTENTION", "torch")
    assert ops.select_attention_backend(cpu) == "torch"
    assert ops.select_attention_backend(cpu, "sdpa") == "sdpa"  # an explicit argument wins
    monkeypatch.setenv("CLIPFORGE_BACKEND_ATTENTION", "flash3")
    with pytest.raises(ValueError, match="unknown backend 'flash3'"):
        ops.select_attention_backend(cpu)


def test_switch_by_capability(monkeypatch):
    monkeypatch.delenv("CLIPFORGE_BACKEND_ATTENTION", raising=False)
    cuda = torch.device("cuda")
    for cap, has_xformers, dtype, expected in [
        ((9, 0), False, torch.bfloat16, "triton"),
        ((8, 0), False, torch.float16, "triton"),
        ((8, 0), False, torch.float32, "sdpa"),  # no tensor cores for exact fp32 dots
        ((9, 0), False, torch.float32, "sdpa"),
        ((9, 0), False, torch.float64, "sdpa"),
        ((7, 0), True, torch.float16, "xformers"),
        ((7, 0), False, torch.float16, "sdpa"),
    ]:
        monkeypatch.setattr(ops, "_cuda_capability", lambda device, cap=cap: cap)
        monkeypatch.setattr(ops, "_has_module", lambda name, x=has_xformers: x)
        assert ops.select_attention_backend(cuda, dtype=dtype, head_dim=64) == expected, (cap, dtype)
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (9, 0))
    assert ops.select_attention_backend(cuda, dtype=torch.bfloat16, head_dim=256) == "sdpa"
    assert ops.select_attention_backend(cuda, dtype=torch.float64, head_dim=64) == "sdpa"
    # forced: fp32 runs on Triton (tiles that fit, see test_tile_heuristic); float64 and sm70 are refused
    assert ops.select_attention_backend(cuda, "triton", dtype=torch.float32, head_dim=64) == "triton"
    with pytest.raises(ValueError, match="not float64; use backend='sdpa'"):
        ops.select_attention_backend(cuda, "triton", dtype=torch.float64, head_dim=64)
    monkeypatch.setattr(ops, "_cuda_capability", lambda device: (7, 0))
    monkeypatch.setattr(ops, "_has_module", lambda name: True)
    with pytest.raises(ValueError, match="compute capability 8.0 or newer.*sm70.*backend='xformers'"):
        ops.select_attention_backend(cuda, "triton", dtype=torch.float16, head_dim=64)


@runnable
def test_ops_triton_backend_matches_sdpa():
    q, k, v = _qkv(2, 2, 19, 32)
    ours = ops.attention(q, k, v, causal=True, backend="triton")
    theirs = ops.attention(q, k, v, causal=True, backend="sdpa")
    _assert_rel("ops triton vs sdpa", ours, theirs, 1e-5)


@runnable
def test_model_triton_backend_matches_sdpa():
    model_mod = pytest.importorskip("clipforge.model")
    torch.manual_seed(0)
    sdpa = model_mod.create_model("tiny-vit", attention_backend="sdpa").to(DEVICE)
    triton_model = model_mod.create_model("tiny-vit", attention_backend="triton").to(DEVICE)
    triton_model.load_state_dict(sdpa.state_dict())
    image_size = sdpa.visual.image_size if hasattr(sdpa.visual, "image_size") else 32
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    tokens = torch.randint(1, 1000, (2, 77), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tokens[:, -1] = 49407  # end-of-text: the features are read at the highest token id

    results = []
    for model in (sdpa, triton_model):
        img, txt, scale = model(images, tokens)
        (img.square().sum() + (txt * img).sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((img.detach(), txt.detach(), grads))
    (img_a, txt_a, grads_a), (img_b, txt_b, grads_b) = results
    _assert_rel("image features", img_b, img_a, 1e-4)
    _assert_rel("text features", txt_b, txt_a, 1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        _assert_rel(f"grad {name}", grads_b[name], grads_a[name], 1e-3)
