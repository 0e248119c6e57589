"""Peak memory of the embedding API over many images: the measurement behind tests/test_api.py's
flat-memory test, at the full count.

    python benchmarks/embed_memory.py                 # 2,000 and 60,000 images (~40 s on 2 cores)
    python benchmarks/embed_memory.py 2000 12000      # any counts

Each count runs in a fresh process: tiny-vit, paths to 10 small PNG files repeated N times, batch 64;
the peak resident set while `embed_images` runs, minus the resident set before it (the process's
VmHWM, reset just before the call). Prints one JSON line per count, with the result's own size.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, sys, time
import numpy as np, torch
from PIL import Image
import clipforge
n, folder = int(sys.argv[1]), sys.argv[2]
for i in range(10):
    p = os.path.join(folder, f"{i}.png")
    if not os.path.exists(p):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
paths = [os.path.join(folder, f"{i % 10}.png") for i in range(n)]
torch.manual_seed(0)
model = clipforge.create_model("tiny-vit").eval()
model.embed_images(paths[:256], batch_size=64, progress=False)  # first-call allocations
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
t = time.perf_counter()
emb = model.embed_images(paths, batch_size=64, progress=False)
print(json.dumps({"images": n, "extra_mb": round(status("VmHWM") - before, 1),
                  "result_mb": round(emb.nbytes / 2**20, 1), "seconds": round(time.perf_counter() - t, 1)}))
"""


def measure(n: int, folder: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), folder], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    counts = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [2000, 60000]
    with tempfile.TemporaryDirectory() as folder:
        for n in counts:
            print(json.dumps(measure(n, folder)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
