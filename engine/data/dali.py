"""The DALI backend: the only module that imports nvidia.dali."""
from __future__ import annotations

import collections
import hashlib
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .loaders import _CaptionBatches, _Loader, _device, _tokenize
from .order import _EpochPlan


class _ThreadAhead:
    """Iterates ds[0], ds[1], ... with one background thread computing up to `depth` items ahead (its
    exceptions surface at the item that raised). close() stops it; so does reaching the end."""

    def __init__(self, ds, depth: int):
        self.ds, self.depth, self.next_index = ds, depth, 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipforge-captions")
        self.pending = collections.deque()
        self._fill()

    def _fill(self):
        while len(self.pending) < self.depth and self.next_index < len(self.ds):
            self.pending.append(self.pool.submit(self.ds.__getitem__, self.next_index))
            self.next_index += 1

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            self.close()
            raise StopIteration
        item = self.pending.popleft().result()
        self._fill()
        return item

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def _index_name(name: str) -> str:
    """A member name as a DALI index field: DALI splits index lines on whitespace (a name with a space
    made it refuse the whole index: "Malformed index file") and reads data by offset and size, using the
    name only to describe the sample; so whitespace becomes "_" (unicode and dots stay)."""
    return "".join("_" if c.isspace() else c for c in name) or "_"


class DaliLoader(_Loader):
    """DALI: readers.webdataset (our per-epoch index) -> decoders.image -> crop/resize -> normalise."""

    backend = "dali"

    def _build(self, plan: _EpochPlan, tmpdir: str):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        from .webdataset import write_index

        # Runs of consecutive samples read from the same tar become one (tar, index) pair; DALI reads
        # the pairs in order and each index in its listed order. One shard in memory at a time.
        paths, indexes = [], []
        for shard, idx in plan.runs():
            samples = self.catalog.shard(shard)
            rows = samples.table[idx]
            cuts = np.flatnonzero(np.diff(rows["img_file"])) + 1
            for part in np.split(np.arange(len(idx)), cuts):
                r0 = rows[part[0]]
                path = os.path.join(tmpdir, f"{len(indexes):06d}.idx")
                write_index(path, ([("jpg", int(r["img_off"]), int(r["img_size"]), _index_name(samples.img_names[s]))]
                                   for r, s in zip(rows[part], idx[part])))
                paths.append(samples.files[r0["img_file"]])
                indexes.append(path)

        dev = _device(self.cfg)
        gpu = dev.type == "cuda"
        S = self.image_size
        seed = int.from_bytes(hashlib.sha1(f"{self.cfg.seed}/{self.epoch}/{self.rank}/{self.position}".encode())
                              .digest()[:4], "little") & 0x7FFFFFFF
        device_id = None  # CPU-only pipeline (no GPU, or no driver): DALI wants None, not -1
        if gpu:
            device_id = dev.index if dev.index is not None else torch.cuda.current_device()
        # exec_dynamic (DALI's default execution model, named so it cannot change under us): each output
        # batch is a fresh buffer that stays valid while referenced, so `_to_torch` can hand it out uncopied.
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.cfg.num_workers), device_id=device_id,
                        seed=seed, prefetch_queue_depth=self._depth(plan), exec_dynamic=True)
        with pipe:
            jpegs = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=["jpg"], random_shuffle=False,
                                          missing_component_behavior="error", name="reader")
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            interp = types.INTERP_CUBIC if self.cfg.interpolation == "bicubic" else types.INTERP_LINEAR
            if self.train:
                images = fn.random_resized_crop(images, size=(S, S), random_area=list(self.cfg.random_area),
                                                random_aspect_ratio=list(self.cfg.random_aspect_ratio),
                                                interp_type=interp, antialias=True)
                crop = None
            else:
                images = fn.resize(images, resize_shorter=S, interp_type=interp, antialias=True)
                crop = (S, S)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                              mean=[255 * m for m in self.cfg.mean], std=[255 * s for s in self.cfg.std])
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _depth(self, plan: _EpochPlan) -> int:
        """DALI's prefetch queue: `prefetch` batches, but never more than the epoch holds."""
        return max(1, min(int(self.cfg.prefetch), plan.num_batches))

    @staticmethod
    def _to_torch(out) -> torch.Tensor:
        from nvidia.dali.tensors import TensorGPU

        tensor = out.as_tensor()
        if isinstance(tensor, TensorGPU):  # DALI copies it into a new CUDA tensor on torch's stream
            from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

            return to_torch_tensor(tensor, copy=True)
        # No copy: under exec_dynamic DALI allocates every output batch anew and the NumPy view keeps
        # it alive (tests/test_data.py holds a whole epoch of batches and checks none changed). The
        # copy cost ~7% of the loader's images/s on 2 cores.
        return torch.from_numpy(np.asarray(tensor))

    def _captions(self, plan):
        ds = _CaptionBatches(plan, self.tokenizer)
        workers = max(0, int(self.cfg.token_workers))
        if workers == 0:
            return _ThreadAhead(ds, depth=max(2, self.cfg.prefetch))
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                                prefetch_factor=max(2, self.cfg.prefetch)))

    def _batches(self, plan):
        if plan.n == 0:
            return
        # Caption workers fork before the DALI pipeline starts its threads.
        captions = self._captions(plan)
        tmpdir = tempfile.mkdtemp(prefix="clipforge-dali-")
        fallback = None
        pipe = None
        try:
            pipe = self._build(plan, tmpdir)
            # schedule_run/outputs rather than run(): run() keeps `prefetch` iterations in flight, so it
            # would decode depth - 1 batches past the epoch's end, and the teardown would wait for them.
            pipe.schedule_run()  # the first call schedules `depth` iterations
            scheduled = self._depth(plan)
            for b in range(plan.num_batches):
                n_b = len(plan.batch_range(b))
                caption_batch = next(captions)
                if b > 0 and scheduled < plan.num_batches:
                    pipe.schedule_run()
                    scheduled += 1
                failure = None
                try:
                    (out,) = pipe.outputs()
                    images = self._to_torch(out)[:n_b]
                except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for a bad batch
                    failure = str(exc).splitlines()[-1][:200]
                if caption_batch is None and failure is None:
                    failure = "a caption could not be read"
                if failure is not None:
                    # Only this batch is lost inside DALI (its pipeline carries on with the next):
                    # decode it again with Pillow, replacing what Pillow cannot read or decode either.
                    self.runtime["dali_failed_batches"] += 1
                    if self.runtime["dali_failed_batches"] == 1:
                        warnings.warn(f"DALI failed on a batch ({failure}); decoding it with Pillow instead. "
                                      f"Counted in loader.stats['runtime'].", RuntimeWarning)
                    if fallback is None:
                        fallback = self._pillow(plan, None)
                    images, used, texts, errors, missing = fallback.decode(b)
                    self.runtime.update(errors)
                    self._vanished(missing)
                    self.runtime["fallback_decoded"] += len(used)
                    tokens, keys = _tokenize(self.tokenizer, texts), [plan.key(i) for i in used]
                    images = images.to(_device(self.cfg))
                else:
                    tokens, keys = caption_batch
                yield images, tokens, keys, n_b
        finally:
            if isinstance(captions, _ThreadAhead):
                captions.close()
            del pipe
            shutil.rmtree(tmpdir, ignore_errors=True)
