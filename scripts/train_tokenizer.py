"""Train the 32,000-piece SentencePiece BPE model shipped as ``dlm_titan/assets/tokenizer.model``.

Settings follow the LLaMA tokenizer that SMDM/TinyLlama use: BPE, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad,
byte fallback (no text is ever unknown), digits split, identity normalization and no whitespace squeezing, so
code indentation and every other byte survive ``decode(encode(x))``. With vocab 32000 the mask id of the
diffusion model is 32000, as in SMDM.

Training reads the lines of the ``train`` split of a SlimPajama-layout corpus (``train/chunk*/*.jsonl.zst``) in
sorted file order with a fixed seed and thread count, so a rerun gives the same model bytes.

Usage::

    python -m scripts.train_tokenizer --corpus dlm_titan/assets/corpus --output dlm_titan/assets/tokenizer.model
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
import zstandard

VOCAB_SIZE = 32_000
SEED = 3407
NUM_THREADS = 2
# Above the ~0.5M lines of the embedded corpus, so it is read whole (no sampling); bounds time on bigger corpora.
INPUT_SENTENCE_SIZE = 2_000_000


def corpus_files(corpus: Path, split: str = "train") -> list[Path]:
    """The split's `.jsonl.zst` files in SlimPajama layout, sorted."""
    return sorted(corpus.glob(f"{split}/chunk*/*.jsonl.zst"))


def iter_texts(files: list[Path]) -> Iterator[str]:
    """The `text` field of every record, in file order."""
    for path in files:
        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                yield json.loads(line)["text"]


def iter_lines(files: list[Path]) -> Iterator[str]:
    """Non-blank lines of every document: SentencePiece trains on newline-free sentences."""
    for text in iter_texts(files):
        for line in text.split("\n"):
            if line.strip():
                yield line


def train(files: list[Path], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Train the BPE model on the lines of files and return the serialized model."""
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_lines(files),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        max_sentence_length=4192,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=INPUT_SENTENCE_SIZE,
        shuffle_input_sentence=True,
        num_threads=NUM_THREADS,
        minloglevel=1,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("dlm_titan/assets/corpus"))
    parser.add_argument("--output", type=Path, default=Path("dlm_titan/assets/tokenizer.model"))
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    files = corpus_files(args.corpus)
    if not files:
        print(
            f"error: no train/chunk*/*.jsonl.zst under {args.corpus}; build it with "
            "`python -m scripts.build_embedded_corpus` or pass --corpus",
            file=sys.stderr,
        )
        sys.exit(2)
    print(
        f"training a {args.vocab_size}-piece BPE model on {len(files)} files under {args.corpus}", flush=True
    )
    start = time.perf_counter()
    model = train(files, args.vocab_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    print(
        f"wrote {args.output} ({len(model):,} bytes, vocab {sp.vocab_size()}) in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
