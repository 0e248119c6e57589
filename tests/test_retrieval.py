"""Chunked retrieval recall against the brute-force PyTorch reference, and its memory bound."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from clipforge import ops, reference
from clipforge.ops import chunked_topk
from clipforge.serve.retrieval import recall_at_k

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(
        getattr(ops.cpp_extension(), "chunked_topk", None) is None, reason="clipforge._C.chunked_topk is not built")),
    "torch",
]


def make_retrieval_set(n_images, captions_per_image, dim, *, noise=1.0, dtype=torch.float64, seed=0, uneven=False):
    """Unit-norm image embeddings and captions = their image + noise (so recall is neither 0 nor 1),
    caption order shuffled so that caption j's image is not j // captions_per_image."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=g, dtype=torch.float64), dim=1)
    if uneven:  # 1 .. captions_per_image captions per image
        counts = torch.randint(1, captions_per_image + 1, (n_images,), generator=g)
        text_to_image = torch.repeat_interleave(torch.arange(n_images), counts)
    else:
        text_to_image = torch.arange(n_images).repeat(captions_per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=g)]
    texts = images[text_to_image] + noise / dim**0.5 * torch.randn(len(text_to_image), dim, generator=g, dtype=torch.float64)
    return images.to(dtype), F.normalize(texts, dim=1).to(dtype), text_to_image


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, m, k, chunk", [(1, 1, 1, None), (7, 13, 1, 1), (7, 13, 13, 3), (33, 100, 5, 8),
                                            (65, 257, 10, None), (65, 257, 64, 1000)])
def test_chunked_topk_matches_full_topk(backend, n, m, k, chunk):
    g = torch.Generator().manual_seed(n * 1000 + m)
    a, b = torch.randn(n, 17, generator=g, dtype=torch.float64), torch.randn(m, 17, generator=g, dtype=torch.float64)
    values, indices = chunked_topk(a, b, k, chunk_size=chunk, backend=backend)
    want_v, want_i = (a @ b.t()).topk(k, dim=1)
    assert indices.dtype == torch.long and values.shape == indices.shape == (n, k)
    torch.testing.assert_close(values, want_v, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, want_i), (indices != want_i).nonzero()[:5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_images, per_image, chunk, ks", [
    (1, 1, None, (1, 5)),          # one pair: every recall is 1, K past the candidate count
    (7, 3, 1, (1, 2, 5, 10)),      # one-row / one-column blocks, uneven captions per image
    (33, 5, 8, (1, 5, 10)),        # uneven last chunk
    (130, 4, None, (1, 5, 10, 50)),
])
def test_recall_small_matches_reference(backend, n_images, per_image, chunk, ks):
    images, texts, t2i = make_retrieval_set(n_images, per_image, 24, noise=2.0, seed=n_images, uneven=True)
    got = recall_at_k(images, texts, t2i, ks=ks, chunk_size=chunk, backend=backend)
    want = reference.retrieval_recall(images, texts, t2i, ks=ks)
    assert got == want
    if n_images == 1:
        assert all(v == 1.0 for v in got.values())


@pytest.fixture(scope="module")
def coco_sized():
    # COCO test-split shape: 5,000 images x 25,000 captions, 5 per image. float64 so that chunked and
    # full GEMMs cannot reorder two candidates whose scores differ by a rounding error.
    images, texts, t2i = make_retrieval_set(5000, 5, 32, noise=1.5)
    return images, texts, t2i, reference.retrieval_recall(images, texts, t2i, ks=(1, 5, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_recall_coco_sized_matches_reference(coco_sized, backend):
    images, texts, t2i, want = coco_sized
    got = recall_at_k(images, texts, t2i, ks=(1, 5, 10), backend=backend)
    assert got == want
    assert 0.05 < want["text_to_image_R@1"] < 0.95 and 0.05 < want["image_to_text_R@1"] < 0.95  # not trivial


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    from clipforge import reference
    from clipforge.serve.retrieval import recall_at_k
    sys.path.insert(0, {tests_dir!r})
    from test_retrieval import make_retrieval_set

    def peak_mb():
        # VmHWM: this process's peak RSS. Not getrusage's ru_maxrss, which Linux carries over exec from
        # the forking parent (pytest, with the big fp64 reference matrices of the other tests).
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    images, texts, t2i = make_retrieval_set(5000, 5, 64, dtype=torch.float32)
    small = make_retrieval_set(50, 5, 64, dtype=torch.float32)
    for backend in {backends!r}:  # warm-up: load BLAS, OpenMP threads, the extension
        recall_at_k(*small, backend=backend)
        reference.retrieval_recall(*small)
    out = {{}}
    for backend in {backends!r}:
        before = peak_mb()
        recall_at_k(images, texts, t2i, backend=backend)
        out[backend] = peak_mb() - before
    before = peak_mb()
    reference.retrieval_recall(images, texts, t2i)
    out["reference"] = peak_mb() - before
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_recall_memory_stays_under_100mb():
    # Peak RSS growth in a fresh process: the chunked paths run first (the peak only rises), then the
    # brute-force reference, which must show its 5,000 x 25,000 fp32 matrix (500 MB): proof that the
    # probe would see a materialised matrix.
    backends = [p if isinstance(p, str) else p.values[0] for p in BACKENDS]
    backends = [b for b in backends if b == "torch" or getattr(ops.cpp_extension(), "chunked_topk", None)]
    code = _MEMORY_PROBE.format(tests_dir=str(__import__("pathlib").Path(__file__).parent), backends=backends)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    for backend in backends:
        assert growth[backend] < 100, growth
    assert growth["reference"] > 450, growth


def test_recall_input_errors():
    images, texts, t2i = make_retrieval_set(4, 2, 8)
    with pytest.raises(ValueError, match="image 3 has no caption"):
        recall_at_k(images, texts[t2i != 3], t2i[t2i != 3])
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        recall_at_k(images, texts, torch.where(t2i == 0, 4, t2i))
    with pytest.raises(ValueError, match="one image index per caption"):
        recall_at_k(images, texts, t2i[:-1])
    with pytest.raises(ValueError, match="share d"):
        recall_at_k(images, texts[:, :4], t2i)
    with pytest.raises(ValueError, match="ks must be positive"):
        recall_at_k(images, texts, t2i, ks=(0,))
    with pytest.raises(ValueError, match="unknown retrieval backend"):
        recall_at_k(images, texts, t2i, backend="cuda")
    with pytest.raises(ValueError, match="k must be in"):
        chunked_topk(images, texts, 9)
