"""Data: LITPKDS shards, tokenizers, corpus preparation (SlimPajama and general corpora), and the exactly
resumable, layout-invariant loaders."""

from .embedded import prepare_embedded, resolve_data_path
from .loader import build_train_loader, build_val_loader, used_sources
from .prepare import SLIMPAJAMA, STARCODER, general_corpus, prepare_split
from .shards import ShardError, read_header, write_shard
from .tokenizer import Tokenizer, load_tokenizer, resolve_vocab_size

__all__ = [
    "SLIMPAJAMA",
    "STARCODER",
    "ShardError",
    "Tokenizer",
    "build_train_loader",
    "build_val_loader",
    "general_corpus",
    "load_tokenizer",
    "prepare_embedded",
    "prepare_split",
    "read_header",
    "resolve_data_path",
    "resolve_vocab_size",
    "used_sources",
    "write_shard",
]
