"""Tokenize any text corpus into LITPKDS shards: jsonl, jsonl.zst, json.gz, parquet, txt, or a datasets folder.

Usage::

    python -m scripts.prepare_corpus --source_path data/my_corpus --tokenizer_path models/Llama-2-7b-hf \\
        --destination_path data/shards --prefix train_slim --text_field text --split train --num_workers 16

``--source_path`` is a folder (``{source}/{split}`` when it exists, else the folder, searched recursively for
.jsonl / .jsonl.zst / .json.gz / .jsonl.gz / .parquet / .txt files), a quoted glob such as ``"raw/*.parquet"``,
one file, or a Hugging Face ``datasets`` folder written by ``save_to_disk`` (its ``--split`` for a DatasetDict;
needs ``pip install -e ".[datasets]"``). ``--tokenizer_path`` is a SentencePiece .model, a tokenizer.json, or a
local folder holding either. Writes ``{prefix}_{stream:06d}_{n:010d}.bin`` (one stream per input file, the same
for any --num_workers) and ``{prefix}_manifest.json``; a re-run skips inputs the manifest marks done. Name the
prefix after what training reads: ``data.train_prefixes`` (``train_slim`` by default) and ``data.val_prefix``
(``validation``).
"""

from __future__ import annotations

import argparse
import sys

from scripts.prepare_slim_pajama import add_common_args, run


def main(argv: list[str] | None = None) -> int:
    from dlm_titan.data.readers import general_corpus
    from dlm_titan.errors import UserError, report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, "train", splits=None)
    parser.add_argument("--prefix", required=True, help="output name prefix, e.g. train_slim or validation")
    parser.add_argument("--text_field", default="text", help="JSON field / column holding each document")
    args = parser.parse_args(argv)
    try:
        corpus = general_corpus(args.text_field)
    except UserError as e:
        return report(e)
    return run(args, corpus, prefix=args.prefix)


if __name__ == "__main__":
    sys.exit(main())
