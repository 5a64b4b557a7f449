"""Data: LITPKDS shards, SlimPajama preparation, and the exactly resumable, layout-invariant loaders."""

from .embedded import prepare_embedded, resolve_data_path
from .loader import build_train_loader, build_val_loader
from .prepare import SLIMPAJAMA, STARCODER, prepare_split
from .shards import ShardError, read_header, write_shard
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "SLIMPAJAMA",
    "STARCODER",
    "ShardError",
    "Tokenizer",
    "build_train_loader",
    "build_val_loader",
    "load_tokenizer",
    "prepare_embedded",
    "prepare_split",
    "read_header",
    "resolve_data_path",
    "write_shard",
]
