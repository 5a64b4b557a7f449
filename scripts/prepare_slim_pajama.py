"""Tokenize SlimPajama (or any folder of .jsonl / .jsonl.zst / .txt files) into LITPKDS shards.

Usage::

    python -m scripts.prepare_slim_pajama --source_path SlimPajama-627B --tokenizer_path tokenizer.model \\
        --destination_path data/slim_star_combined --split train --percentage 1.0 --num_workers 16

Reads ``{source_path}/{split}/chunk*/*.jsonl.zst`` (fields ``text`` and ``meta.redpajama_set_name``), or every
.jsonl/.jsonl.zst/.txt file under ``source_path`` when there is no ``{split}`` folder. Writes
``{split}_slimpajama_{stream:06d}_{n:010d}.bin`` (one stream per input file, so the output is the same for any
--num_workers) and ``{split}_slimpajama_manifest.json``. A re-run skips inputs the manifest marks done.
TinyLlama drops the RedPajamaGithub subset (to add StarCoder code instead); pass --skip_github to do the same.
"""

from __future__ import annotations

import argparse
import os
import sys

from dlm_titan.errors import UserError, report, report_interrupted


def add_common_args(parser: argparse.ArgumentParser, default_split: str,
                    splits: tuple[str, ...] | None = ("train", "validation")) -> None:
    """Arguments shared by the SlimPajama, StarCoder and general-corpus preparers (TinyLlama's names)."""
    from dlm_titan.data.prepare import DEFAULT_CHUNK_SIZE

    parser.add_argument("--source_path", required=True, help="corpus folder")
    parser.add_argument("--tokenizer_path", default="", help="SentencePiece .model, HF tokenizer.json, or a folder "
                        'holding either ("" = the embedded tokenizer)')
    parser.add_argument("--destination_path", required=True, help="output folder of shards")
    parser.add_argument("--split", default=default_split, choices=splits,
                        help="split to read: the {source_path}/{split} folder when it exists (a DatasetDict's split)")
    parser.add_argument("--percentage", type=float, default=1.0, help="fraction of the sorted input files to use")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per shard (2049*1024)")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")


def run(args: argparse.Namespace, corpus, skip_github: bool = False, prefix: str = "") -> int:
    """Prepares one split with parsed arguments; prints a summary line, or one error line and returns 2."""
    from dlm_titan.data.prepare import prepare_split

    try:
        manifest = prepare_split(args.source_path, args.tokenizer_path, args.destination_path, args.split,
                                 args.percentage, args.chunk_size, args.num_workers, skip_github, corpus,
                                 prefix=prefix)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:  # Ctrl-C: the engine has recorded the finished inputs and removed the unfinished ones
        return report_interrupted(f"the inputs finished so far are recorded in {args.destination_path} and the "
                                  "unfinished ones removed: run the same command again to finish (it skips the "
                                  "finished inputs)")
    t = manifest["totals"]
    # Name the output by what its files start with: prepare_corpus's --prefix (e.g. "validation"), not the --split
    # it left at its default "train".
    print(f"{prefix or args.split}: {t['inputs']} files, {t['documents']:,} documents, {t['tokens']:,} tokens, "
          f"{t['shards']} shards in {args.destination_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dlm_titan.data.prepare import SLIMPAJAMA

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, "train")
    parser.add_argument("--skip_github", action="store_true", help="drop RedPajamaGithub documents (TinyLlama)")
    args = parser.parse_args(argv)
    return run(args, SLIMPAJAMA, args.skip_github)


if __name__ == "__main__":
    sys.exit(main())
