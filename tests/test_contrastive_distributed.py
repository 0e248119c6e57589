"""The distributed contrastive loss over gloo (2 and 3 CPU ranks) equals the single-process loss.

Each rank holds n pairs of one global batch of W n pairs. For every backend CI can run (cpp, chunked,
torch, triton under the interpreter) the test checks, against the float64 single-process loss over the whole
batch: the loss on every rank; W x this rank's slice of the feature gradients (the data-parallel
averaging convention of clipforge.loss); the full logit-scale gradient on every rank. Unequal local
batches must raise the same clear error on every rank.

The ranks are subprocesses running this file as a script (`python this_file.py RANK WORLD INIT OUT`).
"""
import os
import sys

import pytest
import torch
from conftest import finish_rank, global_batch, loss_and_grads, rel, run_ranks

N_LOCAL = 13  # odd, and not a multiple of any chunk or block size used
DIM = 24
SCALE = 14.3
CHUNK = 4  # cpp / chunked: uneven row chunks of the 13 local rows


def _global_batch(world: int):
    return global_batch(N_LOCAL * world, DIM, seed=1234 + world)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch.distributed as dist

    import clipforge
    from clipforge import ops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img, txt = _global_batch(world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    backends = ["torch", "triton", "chunked"] + (["cpp"] if ops.cpp_extension() is not None else [])
    results = {}
    for backend in backends:
        i = img[rows].float().clone().requires_grad_(True)
        t = txt[rows].float().clone().requires_grad_(True)
        s = torch.tensor(SCALE, requires_grad=True)
        loss = clipforge.contrastive_loss(i, t, s, group=dist.group.WORLD, backend=backend,
                                          chunk_size=CHUNK if backend in ("cpp", "chunked") else None)
        loss.backward()
        results[backend] = (loss.detach(), i.grad, t.grad, s.grad)
    # unequal local batches: every rank must raise (rank 0 holds one pair fewer)
    n_bad = N_LOCAL - 1 if rank == 0 else N_LOCAL
    finish_rank(results, out_file, lambda: clipforge.contrastive_loss(
        img[:n_bad].float(), txt[:n_bad].float(), SCALE, group=dist.group.WORLD,
        backend="cpp" if "cpp" in backends else "torch"))


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_loss_equals_single_process(world, tmp_path):
    from clipforge import reference

    want, want_img, want_txt, want_scale = loss_and_grads(reference.contrastive_loss, *_global_batch(world), SCALE)

    results = run_ranks(__file__, world, tmp_path)
    backends = [b for b in results[0] if b != "unequal"]
    assert {"torch", "triton", "chunked"} <= set(backends)
    for rank, res in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for backend in backends:
            loss, d_img, d_txt, d_scale = res[backend]
            what = f"{backend}, rank {rank} of {world}"
            assert rel(loss, want) <= 1e-5, f"{what}: loss {loss.item()} != {want.item()}"
            assert rel(d_img / world, want_img[rows]) <= 1e-5, f"{what}: image gradient"
            assert rel(d_txt / world, want_txt[rows]) <= 1e-5, f"{what}: text gradient"
            assert rel(d_scale, want_scale) <= 1e-5, f"{what}: scale gradient {d_scale.item()} != {want_scale.item()}"
        assert res["unequal"] is not None and "same local batch size" in res["unequal"], (
            f"rank {rank}: unequal batches gave {res['unequal']!r}")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
