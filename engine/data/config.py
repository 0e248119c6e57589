"""The data settings (`DataConfig`) and the data path's one error (`DataError`)."""
from __future__ import annotations

from dataclasses import dataclass


# Pillow's own decompression-bomb threshold (~89.5 MP): larger images are skipped as "too_large",
# unless --max-side lets make-shards decode a JPEG at a reduced DCT scale first.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


@dataclass
class DataConfig:
    """Data settings (YAML key `data`). Sizes are per rank."""

    shards: str | list[str] = ""  # folder of .tar, glob, "dir/{00000..00099}.tar", or a list of those
    batch_size: int = 256
    backend: str = "auto"  # auto | dali | pytorch | synthetic
    num_threads: int = 4  # DALI CPU threads, or PyTorch DataLoader decode workers
    # DALI backend: 0 = a thread of this process tokenizes captions `prefetch` batches ahead; N > 0 = N
    # DataLoader processes do. The thread was ~10% faster on 2 CPU cores (a process's IPC costs more
    # than the tokenizing, ~1 ms per 64 captions); processes pay off when one process feeds many GPUs.
    token_workers: int = 0
    seed: int = 0
    shuffle: bool = True  # training order; evaluation never shuffles
    drop_last: bool = False
    random_area: tuple[float, float] = (0.9, 1.0)  # OpenCLIP's RandomResizedCrop scale
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_dir: str | None = None  # read-time validation cache (default ~/.cache/clipforge/shards)
    prefetch: int = 2  # batches prepared ahead
    device: str | None = None  # where DALI decodes / the PyTorch path pins: None = cuda if available
    synthetic_samples: int = 1024
    synthetic_classes: int = 16

    @classmethod
    def from_dict(cls, data) -> "DataConfig":
        if isinstance(data, cls):
            return data
        from ..config import dataclass_from_dict

        return dataclass_from_dict(cls, data, "data")


class DataError(ValueError):
    """The shards cannot be used as configured; the message names the file or key."""
