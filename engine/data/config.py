"""The data settings (`DataConfig`) and the data path's one error (`DataError`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..model.transforms import CLIP_MEAN, CLIP_STD, INTERPOLATIONS


# Pillow's own decompression-bomb threshold (~89.5 MP): larger images are skipped as "too_large",
# unless --max-side lets make-shards decode a JPEG at a reduced DCT scale first.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


DEFAULT_BATCH_SIZE = 256  # a loader built directly, without batch_size
KINDS = ("synthetic", "webdataset")
LOADERS = ("auto", "dali", "pytorch", "synthetic")


@dataclass
class DataConfig:
    """The data settings: the run config's `data` section, and what the loaders take. Sizes are per rank.

    One config for both: `clipforge.train` nests it (`TrainConfig.data`) and hands it to the loaders as it
    is, so every key here can be set in a run config's YAML.
    """

    # synthetic: generated in memory (data/synthetic.py), the same global batches on any number of ranks;
    # webdataset: shards read by the loaders (DALI or PyTorch/Pillow), each rank its own slice
    kind: str = "synthetic"
    path: str | list[str] | None = None  # shards: folder of .tar, glob, "dir/{00000..00099}.tar", or a list
    eval_path: str | list[str] | None = None  # held-out shards for evaluation during training
    # Several sources mixed per batch (data/sources.py), instead of data.path: [{path: <what data.path
    # takes>, weight: w}, ...]; weight (default 1) = the expected fraction of the training samples drawn
    # from the source, w / sum of the weights. data.path is then filled in with the sources' paths.
    sources: list[dict] | None = None
    # OpenCLIP's --train-data-upsampling-factors, one per source of its data.path "a::b" (--train-data): a
    # factor scales the chance of drawing each shard of its source, so a source's share is factor x its
    # size; here its weight = factor x its usable samples (no factors: in proportion to size, as OpenCLIP)
    upsampling_factors: tuple[float, ...] | None = None
    # OpenCLIP's --dataset-resampled: every source an endless stream of shards drawn with replacement
    resampled: bool = False
    loader: str = "auto"  # auto (DALI when it imports, else PyTorch) | dali | pytorch | synthetic (tests)
    num_workers: int = 4  # DALI CPU threads, or PyTorch DataLoader decode workers
    # DALI: 0 = a thread of this process tokenizes captions `prefetch` batches ahead; N > 0 = N DataLoader
    # processes do (they pay off when one process feeds many GPUs; docs/BENCHMARKS.md has the figures)
    token_workers: int = 0
    cache_dir: str | None = None  # read-time validation cache (default ~/.cache/clipforge/shards)
    seed: int = 0  # the data order: shard and sample permutations, mixes, resampled draws and crops
    shuffle: bool = True  # training order; evaluation never shuffles
    # per-rank batch; None: DEFAULT_BATCH_SIZE for a loader built directly. A training run takes
    # batch.global_size / world size and refuses any other value here.
    batch_size: int | None = None
    # None: False for a loader built directly. A training run always drops the last partial batch (its
    # ranks step in lock-step) and refuses false here.
    drop_last: bool | None = None
    random_area: tuple[float, float] = (0.9, 1.0)  # OpenCLIP's RandomResizedCrop scale
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # OpenCLIP's RandomResizedCrop ratio
    interpolation: str = "bicubic"  # bicubic | bilinear: the resize of the crop (training and evaluation)
    mean: tuple[float, float, float] = CLIP_MEAN  # normalisation of the pixels in [0, 1]: (x - mean) / std
    std: tuple[float, float, float] = CLIP_STD  # with mean: CLIP's statistics by default
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (decompression bombs)
    prefetch: int = 2  # batches prepared ahead
    device: str | None = None  # where DALI decodes / the PyTorch path pins: None = cuda if available
    num_samples: int = 4096  # synthetic: data set size (training wraps around it)
    num_classes: int = 32  # synthetic: (image, caption) prototypes the pairs are drawn from
    context_length: int = 16  # synthetic: caption length in tokens (<= the model's context length)

    def __post_init__(self):
        if self.path is None and self.sources is not None:  # what every shard-listing key reads
            self.path = source_paths(self.sources)

    @classmethod
    def from_dict(cls, data) -> "DataConfig":
        if isinstance(data, cls):
            return data
        from ..config import dataclass_from_dict

        return dataclass_from_dict(cls, data, "data")

    @property
    def loader_batch_size(self) -> int:
        return int(self.batch_size) if self.batch_size is not None else DEFAULT_BATCH_SIZE

    def check(self) -> None:
        """Refuse impossible values, naming the key (the loaders and the run config both call it)."""
        if self.kind not in KINDS:
            raise DataError(f"config key 'data.kind' must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.loader not in LOADERS:
            raise DataError(f"config key 'data.loader' must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        for key in ("num_workers", "token_workers"):
            if int(getattr(self, key)) < 0:
                raise DataError(f"config key 'data.{key}' must be >= 0, got {getattr(self, key)}")
        if int(self.seed) < 0:  # the epoch order draws from numpy's SeedSequence([seed, epoch, ...])
            raise DataError(f"config key 'data.seed' must be >= 0, got {self.seed}")
        for key in ("prefetch", "max_pixels", "num_samples", "num_classes"):
            if int(getattr(self, key)) < 1:
                raise DataError(f"config key 'data.{key}' must be positive, got {getattr(self, key)}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise DataError(f"config key 'data.batch_size' must be positive, got {self.batch_size}")
        for key in ("random_area", "random_aspect_ratio"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                raise DataError(f"config key 'data.{key}' must be two numbers 0 < low <= high, got {getattr(self, key)}")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"config key 'data.interpolation' must be one of {', '.join(INTERPOLATIONS)}, "
                            f"got {self.interpolation!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) != 3 or (key == "std" and min(value) <= 0):
                raise DataError(f"config key 'data.{key}' must be three numbers (R, G, B){' above 0' if key == 'std' else ''}, "
                                f"got {value}")
        if self.random_area[1] > 1:
            raise DataError(f"config key 'data.random_area' is a fraction of the image area (<= 1), got {self.random_area}")
        self._check_sources()

    def _check_sources(self) -> None:
        """data.sources / data.path "a::b" / data.upsampling_factors / data.resampled."""
        if not isinstance(self.resampled, bool):
            raise DataError(f"config key 'data.resampled' must be true or false, got {self.resampled!r}")
        if self.sources is not None:
            if not isinstance(self.sources, (list, tuple)) or not self.sources:
                raise DataError("config key 'data.sources' must be a list of {path: ..., weight: ...}, got "
                                f"{self.sources!r}")
            for i, source in enumerate(self.sources):
                key = f"data.sources[{i}]"
                if not isinstance(source, dict):
                    raise DataError(f"config key '{key}' must be a mapping {{path: ..., weight: ...}}, got {source!r}")
                for name in source:
                    if name not in SOURCE_KEYS:
                        raise DataError(f"unknown config key '{key}.{name}' (known keys here: {', '.join(SOURCE_KEYS)})")
                if "path" not in source:
                    raise DataError(f"config key '{key}.path' is required: the source's shards (a folder, glob, "
                                    "brace range or list)")
                path = source["path"]
                if not (isinstance(path, str) and path) and not (
                        isinstance(path, (list, tuple)) and path and all(isinstance(p, str) and p for p in path)):
                    raise DataError(f"config key '{key}.path' must be a folder, glob, brace range or list of them, "
                                    f"got {path!r}")
                if isinstance(path, str) and "::" in path:
                    raise DataError(f"config key '{key}.path' holds '::' (OpenCLIP's separator of sources): give each "
                                    "source its own entry in data.sources")
                _positive_number(f"{key}.weight", source.get("weight", 1.0))
            if self.path != source_paths(self.sources):
                raise DataError("config keys 'data.path' and 'data.sources' are both set: list the shards in one of "
                                "them (data.sources: [{path: ..., weight: ...}, ...] to mix several sources)")
            if self.upsampling_factors is not None:
                raise DataError("config key 'data.upsampling_factors' goes with OpenCLIP's data.path 'a::b'; with "
                                "data.sources give each source its weight (data.sources[i].weight)")
            return
        parts = split_sources(self.path)
        if parts is not None and not all(p.strip() for p in parts):
            raise DataError(f"config key 'data.path' ({self.path!r}) has an empty source between its '::' separators")
        if self.upsampling_factors is not None:
            if parts is None:
                raise DataError("config key 'data.upsampling_factors' needs several sources in data.path, separated "
                                "by '::' (OpenCLIP's form), e.g. /data/a/{00000..00099}.tar::/data/b")
            if len(self.upsampling_factors) != len(parts):
                raise DataError(f"config key 'data.upsampling_factors' has {len(self.upsampling_factors)} numbers for "
                                f"the {len(parts)} sources of data.path: give one per source")
            for i, factor in enumerate(self.upsampling_factors):
                _positive_number(f"data.upsampling_factors[{i}]", factor)


SOURCE_KEYS = ("path", "weight")


def source_paths(sources) -> list[str] | None:
    """Every shard spec of data.sources, in order (the value data.path takes with data.sources)."""
    if not isinstance(sources, (list, tuple)) or not all(isinstance(s, dict) for s in sources):
        return None
    out = []
    for s in sources:
        path = s.get("path")
        out.extend(path if isinstance(path, (list, tuple)) else [path])
    return out


def split_sources(path) -> list[str] | None:
    """The sources of OpenCLIP's data.path "a::b" form, None for a path without '::'."""
    if isinstance(path, str) and "::" in path:
        return path.split("::")
    return None


def _positive_number(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DataError(f"config key '{key}' must be a positive finite number, got {value!r}")


class DataError(ValueError):
    """The shards cannot be used as configured; the message names the file or key."""
