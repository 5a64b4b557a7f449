"""Tokenize a code corpus (StarCoder-style parquet, or .jsonl / .jsonl.zst, field ``content``) into shards.

Usage::

    python -m scripts.prepare_starcoder --source_path starcoderdata --tokenizer_path tokenizer.model \\
        --destination_path data/slim_star_combined --num_workers 16

Writes ``train_starcoder_{stream:06d}_{n:010d}.bin`` (matched by the SMDM/TinyLlama prefix ``train_star``) and
``train_starcoder_manifest.json``. Parquet needs pyarrow (``pip install pyarrow``); jsonl does not.
"""

from __future__ import annotations

import argparse
import sys

from scripts.prepare_slim_pajama import add_common_args, run


def main(argv: list[str] | None = None) -> int:
    from dlm_titan.data.prepare import STARCODER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, "train")
    return run(parser.parse_args(argv), STARCODER)


if __name__ == "__main__":
    sys.exit(main())
