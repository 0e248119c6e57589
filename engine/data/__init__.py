"""The data path: webdataset shards -> validated catalog -> epoch order -> (images, tokens) batches.

The package face only re-exports; each concern has its module (config, images, webdataset, validate,
catalog, order, sources, loaders, dali, synthetic, tables, make_shards). See docs/DESIGN.md.
"""
from .catalog import Catalog, ShardRef, ShardSamples, build_catalog
from .config import DataConfig, DataError
from .dali import DaliLoader
from .images import CLIP_MEAN, CLIP_STD, normalize_uint8, pil_decode, pil_transform
from .loaders import RUNTIME_COUNTERS, PyTorchLoader, build_eval_loader, build_train_loader
from .order import rank_segments, rank_slice, shard_permutation
from .sources import Mixture, is_mixed, source_catalog
from .synthetic import SyntheticLoader
from .webdataset import expand_shards

__all__ = ["Catalog", "ShardRef", "ShardSamples", "build_catalog", "DataConfig", "DataError", "DaliLoader",
           "CLIP_MEAN", "CLIP_STD", "normalize_uint8", "pil_decode", "pil_transform", "RUNTIME_COUNTERS",
           "PyTorchLoader", "build_eval_loader", "build_train_loader", "rank_segments", "rank_slice",
           "shard_permutation", "SyntheticLoader", "expand_shards", "Mixture", "is_mixed", "source_catalog"]
