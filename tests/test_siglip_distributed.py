"""The distributed SigLIP loss over gloo (2 and 3 CPU ranks) equals the single-process loss.

Each rank holds n pairs of one global batch of W n pairs. For every backend CI can run (cpp, chunked,
torch, triton under the interpreter) the test checks, against the float64 single-process loss over the
whole batch: the loss on every rank; W x this rank's slice of the feature gradients (the data-parallel
convention of clipforge.siglip_loss); the full t and b gradients on every rank. It also runs OpenCLIP's
SigLipLoss(rank, world_size) on the same ranks, to check the convention difference the module docstring
states: its per-rank value averages to the global loss, its feature gradients equal ours, its t and b
gradients average to ours. Unequal local batches must raise the same clear error on every rank.

The ranks are subprocesses running this file as a script (`python this_file.py RANK WORLD INIT OUT`).
"""
import os
import sys

import pytest
import torch
from conftest import finish_rank, global_batch, loss_and_grads, rel, run_ranks

N_LOCAL = 13  # odd, and not a multiple of any chunk or block size used
DIM = 24
SCALE, BIAS = 10.0, -4.0
CHUNK = 4  # cpp / chunked: uneven row chunks of the 13 local rows


def _global_batch(world: int):
    return global_batch(N_LOCAL * world, DIM, seed=4321 + world)


def _leaves(img, txt, rows):
    i = img[rows].float().clone().requires_grad_(True)
    t = txt[rows].float().clone().requires_grad_(True)
    return i, t, torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch.distributed as dist

    import clipforge
    from clipforge import ops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img, txt = _global_batch(world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    backends = ["torch", "triton", "chunked"] + (["cpp"] if ops.siglip_kernels("cpp") is not None else [])
    results = {}
    for backend in backends:
        i, t, s, b = _leaves(img, txt, rows)
        loss = clipforge.siglip_loss(i, t, s, b, group=dist.group.WORLD, backend=backend,
                                     chunk_size=CHUNK if backend in ("cpp", "chunked") else None)
        loss.backward()
        with torch.no_grad():  # the value alone (no gradient pass)
            value = clipforge.siglip_loss(i, t, s, b, group=dist.group.WORLD, backend=backend)
        results[backend] = (loss.detach(), i.grad, t.grad, s.grad, b.grad, value)
    try:
        import open_clip
    except ImportError:
        results["openclip"] = None
    else:  # its default exchange (bidirectional neighbour exchange, point-to-point on gloo)
        i, t, s, b = _leaves(img, txt, rows)
        loss = open_clip.loss.SigLipLoss(rank=rank, world_size=world)(i, t, s, b)
        loss.backward()
        results["openclip"] = (loss.detach(), i.grad, t.grad, s.grad, b.grad)
    # unequal local batches: every rank must raise (rank 0 holds one pair fewer)
    n_bad = N_LOCAL - 1 if rank == 0 else N_LOCAL
    finish_rank(results, out_file, lambda: clipforge.siglip_loss(
        img[:n_bad].float(), txt[:n_bad].float(), SCALE, BIAS, group=dist.group.WORLD,
        backend="cpp" if "cpp" in backends else "chunked"))


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_loss_equals_single_process(world, tmp_path):
    from clipforge import reference

    want, want_img, want_txt, want_scale, want_bias = loss_and_grads(reference.siglip_loss, *_global_batch(world),
                                                                     SCALE, BIAS)

    results = run_ranks(__file__, world, tmp_path)
    backends = [k for k in results[0] if k not in ("unequal", "openclip")]
    assert {"torch", "triton", "chunked"} <= set(backends)
    for rank, res in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for backend in backends:
            loss, d_img, d_txt, d_scale, d_bias, value = res[backend]
            what = f"{backend}, rank {rank} of {world}"
            assert rel(loss, want) <= 1e-5, f"{what}: loss {loss.item()} != {want.item()}"
            assert rel(value, want) <= 1e-5, f"{what}: value without gradients {value.item()}"
            assert rel(d_img / world, want_img[rows]) <= 1e-5, f"{what}: image gradient"
            assert rel(d_txt / world, want_txt[rows]) <= 1e-5, f"{what}: text gradient"
            assert rel(d_scale, want_scale) <= 1e-5, f"{what}: scale gradient {d_scale.item()} != {want_scale.item()}"
            assert rel(d_bias, want_bias) <= 1e-5, f"{what}: bias gradient {d_bias.item()} != {want_bias.item()}"
        assert res["unequal"] is not None and "siglip_loss needs the same local batch size" in res["unequal"], (
            f"rank {rank}: unequal batches gave {res['unequal']!r}")

    # OpenCLIP's SigLipLoss on the same ranks: the convention difference of clipforge.siglip_loss's docstring
    if results[0]["openclip"] is None:
        pytest.skip("open_clip is not installed")
    ours = [res["cpp" if "cpp" in backends else "chunked"] for res in results]
    theirs = [res["openclip"] for res in results]
    losses = torch.stack([x[0].double() for x in theirs])
    assert rel(losses.mean(), want) <= 1e-5  # its per-rank values average to the global loss ...
    assert (losses - want).abs().max() > 1e-3 * want.item()  # ... but are not the global loss
    for rank in range(world):
        for k, name in ((1, "image"), (2, "text")):  # the same feature gradients: W x the global one
            assert rel(theirs[rank][k], ours[rank][k].double()) <= 1e-5, f"rank {rank}: {name} gradient"
    for k, name in ((3, "scale"), (4, "bias")):  # t and b: averaged over ranks, the full gradient (ours)
        assert rel(torch.stack([x[k].double() for x in theirs]).mean(), ours[0][k].double()) <= 1e-5, name


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
