"""clipforge._C: boundary checks, chunked top-k, statistics, and the CMake build of the same sources."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clipforge import ops, reference

_C = ops.cpp_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="clipforge._C is not built")
ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_forward_statistics_match_logsumexp(chunk):
    img, txt = _rand(37, 16, dtype=torch.float64), _rand(41, 16, dtype=torch.float64, seed=1)
    logits = 7.5 * img @ txt.t()
    row_lse, col_max, col_sum = _C.contrastive_forward(img, txt, 7.5, chunk)
    torch.testing.assert_close(row_lse, torch.logsumexp(logits, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(col_max + col_sum.log(), torch.logsumexp(logits, 0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(col_max, logits.amax(0), rtol=0, atol=1e-12)


def test_backward_with_row_offset_matches_autograd():
    # the rows of one rank (offset 10 in a 30-pair global batch): d_image, the partial d_text, d_scale
    img_all, txt = _rand(30, 8, dtype=torch.float64), _rand(30, 8, dtype=torch.float64, seed=1)
    i = img_all.clone().requires_grad_(True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    t = txt.clone().requires_grad_(True)
    reference.contrastive_loss(i, t, s).backward()
    logits = 3.0 * img_all @ txt.t()
    row_lse, col_lse = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
    parts = [_C.contrastive_backward(img_all[a:a + 10].contiguous(), txt, 3.0, row_lse[a:a + 10].contiguous(),
                                     col_lse, a, 1 / 60, 4) for a in (0, 10, 20)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), i.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sum(p[1] for p in parts), t.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sum(p[2] for p in parts), s.grad, rtol=1e-12, atol=1e-14)


def test_boundary_checks_raise_one_clear_sentence():
    img, txt = _rand(4, 8), _rand(4, 8)
    lse = torch.zeros(4, dtype=torch.float64)
    cases = [
        (lambda: _C.contrastive_forward(img.int(), txt.int(), 1.0, 0), "float32 or float64"),
        (lambda: _C.contrastive_forward(img, txt.double(), 1.0, 0), "same dtype"),
        (lambda: _C.contrastive_forward(img[0], txt, 1.0, 0), "2-D"),
        (lambda: _C.contrastive_forward(_rand(8, 4).t(), txt, 1.0, 0), "contiguous"),
        (lambda: _C.contrastive_forward(img, _rand(4, 7), 1.0, 0), "same feature dimension"),
        (lambda: _C.contrastive_forward(img, txt, float("nan"), 0), "finite"),
        (lambda: _C.contrastive_forward(img, txt, 1.0, -1), "chunk_size"),
        (lambda: _C.contrastive_backward(img, txt, 1.0, lse, lse, 1, 0.1, 0), "must pair with text rows"),
        (lambda: _C.contrastive_backward(img, txt, 1.0, lse[:3], lse, 0, 0.1, 0), "row_lse must have shape"),
        (lambda: _C.contrastive_backward(img, txt, 1.0, lse.float(), lse, 0, 0.1, 0), "dtype"),
        (lambda: _C.chunked_topk(img, txt, 5, 0, 0), "k must be in"),
        (lambda: _C.chunked_topk(img, txt.double(), 2, 0, 0), "share a dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# The float32 fast path (one exp per logit, vectorised) against the exact two-exp path and float64.
def _stats_and_grads(img, txt, scale, chunk, mode, lse_from=None):
    row_lse, col_ref, col_sum = _C.contrastive_forward(img, txt, scale, chunk, mode)
    col_lse = col_ref + col_sum.log()
    r, c = lse_from if lse_from is not None else (row_lse, col_lse)
    grads = _C.contrastive_backward(img, txt, scale, r, c, 0, 1 / (2 * img.shape[0]), chunk, mode)
    return (row_lse, col_lse), grads


@pytest.mark.parametrize("n, d, chunk", [(300, 64, 0), (77, 33, 5), (1, 16, 0), (129, 512, 64)])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_fast_path_matches_exact_path_and_float64(n, d, chunk, scale):
    # m = n is not a multiple of the 16 vector lanes in most cases: the tails are covered
    img = torch.nn.functional.normalize(_rand(n, d), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * _rand(n, d, seed=1), dim=1)
    truth = 1.0 * scale * img.double() @ txt.double().t()
    want_r, want_c = torch.logsumexp(truth, 1), torch.logsumexp(truth, 0)
    (r1, c1), g1 = _stats_and_grads(img, txt, scale, chunk, 1)
    rows = _C.auto_chunk_rows(n, n, 4, 16 << 20) if chunk == 0 else chunk
    # the fast forward refuses a chunk where some column's max is ~57 below the chunk's max
    spread = max((b.max() - b.amax(0).min()).item() for b in truth.split(rows))
    fast = True
    try:
        r2, ref2, sum2 = _C.contrastive_forward(img, txt, scale, chunk, 2)
    except RuntimeError as e:
        assert "fast path" in str(e) and spread > 50, (e, spread)
        r2, ref2, sum2, fast = r1, c1, torch.ones_like(c1), False
    c2 = ref2 + sum2.log()
    # the fast backward refuses log-sum-exps that span more than 50
    span = (max(r1.max(), c1.max()) - min(r1.min(), c1.min())).item()
    try:
        g2 = _C.contrastive_backward(img, txt, scale, r1, c1, 0, 1 / (2 * n), chunk, 2)
    except RuntimeError as e:
        assert "fast path" in str(e) and span > 50, (e, span)
        g2, fast = g1, False
    assert fast or scale == 100.0  # at CLIP's usual scales the fast path is the one that runs
    for got in (r1, r2):
        torch.testing.assert_close(got, want_r, rtol=0, atol=2e-5 * scale)
    for got in (c1, c2):
        torch.testing.assert_close(got, want_c, rtol=0, atol=2e-5 * scale)
    for a, b in zip(g1, g2):
        assert (a - b).norm() <= 2e-6 * max(b.norm(), 1e-6)


def test_fast_path_range_checks_fall_back_to_the_exact_path():
    # One text column far below every other column of its chunk (logits -100 and one 0, where the chunk
    # reaches +100), and one image row far below the rest: outside the fast path's float32 range.
    d, n = 8, 40
    e1, e2 = torch.zeros(d), torch.zeros(d)
    e1[0] = e2[1] = 1.0
    img = torch.nn.functional.normalize(e1 + 0.05 * _rand(n, d), dim=1)
    txt = torch.nn.functional.normalize(e1 + 0.05 * _rand(n, d, seed=1), dim=1)
    txt[3] = -e1
    img[5] = -e2
    truth = 100.0 * img.double() @ txt.double().t()
    want_r, want_c = torch.logsumexp(truth, 1), torch.logsumexp(truth, 0)
    with pytest.raises(RuntimeError, match="fast path"):
        _C.contrastive_forward(img, txt, 100.0, 0, 2)
    (r, c), grads = _stats_and_grads(img, txt, 100.0, 0, 0)  # auto: falls back, exactly
    torch.testing.assert_close(r, want_r, rtol=0, atol=1e-4)
    torch.testing.assert_close(c, want_c, rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError, match="fast path"):
        _C.contrastive_backward(img, txt, 100.0, r, c, 0, 1 / 80, 0, 2)
    i = img.double().requires_grad_(True)
    t = txt.double().requires_grad_(True)
    s = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    reference.contrastive_loss(i, t, s).backward()
    for got, want in zip(grads, (i.grad, t.grad, s.grad)):
        assert (got.double() - want).norm() <= 1e-5 * want.norm()
    # the row alone far below its slice stays on the fast path (that row is summed exactly)
    txt[3] = e1
    truth = 100.0 * img.double() @ txt.double().t()
    r2, ref2, sum2 = _C.contrastive_forward(img, txt, 100.0, 0, 2)
    torch.testing.assert_close(r2, torch.logsumexp(truth, 1), rtol=0, atol=1e-4)
    torch.testing.assert_close(ref2 + sum2.log(), torch.logsumexp(truth, 0), rtol=0, atol=1e-4)


def test_auto_mode_takes_the_fast_path_on_typical_inputs():
    # bit-equal to the forced fast path, and not to the exact path (their roundings differ)
    img = torch.nn.functional.normalize(_rand(300, 64), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * _rand(300, 64, seed=1), dim=1)
    auto = _C.contrastive_forward(img, txt, 14.3, 0, 0)
    fast = _C.contrastive_forward(img, txt, 14.3, 0, 2)
    exact = _C.contrastive_forward(img, txt, 14.3, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(auto, fast))
    assert not torch.equal(auto[0], exact[0])
    r, c = auto[0], auto[1] + auto[2].log()
    g_auto = _C.contrastive_backward(img, txt, 14.3, r, c, 0, 1 / 600, 0, 0)
    g_fast = _C.contrastive_backward(img, txt, 14.3, r, c, 0, 1 / 600, 0, 2)
    g_exact = _C.contrastive_backward(img, txt, 14.3, r, c, 0, 1 / 600, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(g_auto, g_fast))
    assert not torch.equal(g_auto[0], g_exact[0])


@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_auto_mode_loss_and_gradients_against_float64(scale):
    """Through clipforge.contrastive_loss: fast chunks, and at scale 100 chunks that fall back (a text
    column anti-aligned with most images), mixed in one call; value and gradients vs float64."""
    import clipforge

    n, d = 700, 32
    img = torch.nn.functional.normalize(_rand(n, d), dim=1)
    txt = torch.nn.functional.normalize(img + 0.7 * _rand(n, d, seed=1), dim=1)
    if scale == 100.0:
        # image rows 320-383 (the 6th chunk of 64) cluster around e, text rows 0-49 sit at -e: in that chunk
        # those columns lie ~180 below the chunk's maximum, so it and the chunks after it take the exact
        # path while chunks 1-5 stay fast
        e = torch.nn.functional.normalize(_rand(1, d, seed=2), dim=1)
        img[320:384] = torch.nn.functional.normalize(e + 0.05 * _rand(64, d, seed=3), dim=1)
        txt[320:384] = torch.nn.functional.normalize(img[320:384] + 0.05 * _rand(64, d, seed=4), dim=1)
        txt[:50] = torch.nn.functional.normalize(-e + 0.05 * _rand(50, d, seed=5), dim=1)
        spread = [(b.max() - b.amax(0).min()).item() for b in (scale * img.double() @ txt.double().t()).split(64)]
        assert max(spread[:5]) < 57 and spread[5] > 60, spread

    def run(i, t, dtype):
        i = i.detach().to(dtype).clone().requires_grad_(True)
        t = t.detach().to(dtype).clone().requires_grad_(True)
        s = torch.tensor(scale, dtype=dtype, requires_grad=True)
        backend = "cpp" if dtype == torch.float32 else "torch"
        loss = clipforge.contrastive_loss(i, t, s, backend=backend, chunk_size=64)
        loss.backward()
        return [x.double() for x in (loss.detach(), i.grad, t.grad, s.grad)]

    got, want = run(img, txt, torch.float32), run(img, txt, torch.float64)
    for name, a, b in zip(("loss", "d_image", "d_text", "d_scale"), got, want):
        assert (a - b).norm() <= 1e-5 * b.norm(), name


@pytest.mark.parametrize("where", ["image", "text", "every_logit"])
def test_nan_features_give_a_nan_loss_and_gradients(where):
    import clipforge

    img = torch.nn.functional.normalize(_rand(50, 16), dim=1)
    txt = torch.nn.functional.normalize(_rand(50, 16, seed=1), dim=1)
    if where == "image":
        img[7, 3] = float("nan")
    elif where == "text":
        txt[11, 0] = float("nan")
    else:
        img[:] = float("nan")
    img.requires_grad_(True)
    scale = torch.tensor(14.3, requires_grad=True)
    loss = clipforge.contrastive_loss(img, txt, scale, backend="cpp")
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(img.grad).any() and torch.isnan(scale.grad)


def test_mode_is_checked():
    img = _rand(4, 8)
    with pytest.raises(RuntimeError, match="mode must be"):
        _C.contrastive_forward(img, img, 1.0, 0, 3)
    with pytest.raises(RuntimeError, match="float32 only"):
        _C.contrastive_forward(img.double(), img.double(), 1.0, 0, 2)


@pytest.mark.parametrize(
    "n, m, k, row_chunk, col_chunk",
    [(1, 1, 1, 0, 0), (37, 129, 5, 8, 16), (37, 129, 20, 5, 7), (64, 300, 300, 0, 64), (10, 50, 3, 0, 0)],
)
def test_chunked_topk_matches_full_topk(n, m, k, row_chunk, col_chunk):
    a, b = _rand(n, 16), _rand(m, 16, seed=1)
    values, indices = _C.chunked_topk(a, b, k, row_chunk, col_chunk)
    want_v, want_i = torch.topk(a.double() @ b.double().t(), k, dim=1)
    assert indices.dtype == torch.int64 and values.shape == (n, k)
    torch.testing.assert_close(values.double(), want_v, rtol=1e-5, atol=1e-5)
    # random data has no ties: the same columns in the same order
    assert torch.equal(indices, want_i)


def test_auto_chunk_rows_keeps_a_chunk_near_the_target():
    assert _C.auto_chunk_rows(8192, 8192, 4, 8 << 20) == 256
    assert _C.auto_chunk_rows(10, 8192, 4, 8 << 20) == 10
    assert _C.auto_chunk_rows(100, 10**9, 4, 8 << 20) == 1


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_produces_a_working_extension(tmp_path):
    """Configure and build CMakeLists.txt into a temporary directory, then load the module and compare it
    with the setup.py build (~1-2 min of compiling on the 2-core CI machine)."""
    import pybind11

    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    built = list(build.glob("_C*.so"))
    assert len(built) == 1, f"expected one _C*.so in {build}, found {built}"
    script = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("_C", {str(built[0])!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        from clipforge import _C
        a, b = torch.randn(33, 16), torch.randn(33, 16)
        for x, y in zip(mod.contrastive_forward(a, b, 5.0, 4), _C.contrastive_forward(a, b, 5.0, 4)):
            assert torch.equal(x, y)
        v, i = mod.chunked_topk(a, b, 3, 4, 8)
        assert torch.equal(i, torch.topk(a @ b.t(), 3, dim=1).indices)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
