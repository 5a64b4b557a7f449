"""Building blocks of ``scripts/build_embedded_corpus.py``: Debian sources, text extraction, split, writers.

Only that script (and its tests) import these modules, so they live beside it rather than in ``dlm_titan``.
"""
