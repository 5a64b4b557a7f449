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

from dlm_titan.errors import EXIT_USER_ERROR, UserError
from scripts.prepare_slim_pajama import add_common_args


def main(argv: list[str] | None = None) -> int:
    from dlm_titan.data.prepare import STARCODER, prepare_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "train")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_split(args.source_path, args.tokenizer_path, args.destination_path, args.split,
                                 args.percentage, args.chunk_size, args.num_workers, False, STARCODER)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    t = manifest["totals"]
    print(f"{args.split}: {t['inputs']} files, {t['documents']:,} documents, {t['tokens']:,} tokens, "
          f"{t['shards']} shards in {args.destination_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
