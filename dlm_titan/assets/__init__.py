"""Files shipped with the package so that dlm_titan trains anywhere, offline.

- ``corpus/``: a small real corpus in SlimPajama layout (``{train,validation}/chunk1/*.jsonl.zst``), built by
  ``python -m scripts.build_embedded_corpus``; sources, licences and counts in ``corpus/SOURCES.md``.
- ``tokenizer.model``: a 32,000-piece SentencePiece BPE model trained on its train split by
  ``python -m scripts.train_tokenizer`` (so the diffusion mask id is 32000, as in SMDM).
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

EMBEDDED_CORPUS_DIR: Path = _HERE / "corpus"
EMBEDDED_TOKENIZER_PATH: Path = _HERE / "tokenizer.model"
