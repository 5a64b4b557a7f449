"""Dedup and train/validation split of the documents: deterministic, stratified by set, disjoint texts."""

from __future__ import annotations

import hashlib

from scripts.embedded_corpus.doc import Doc

VALIDATION_FRACTION = 0.03
MIN_VALIDATION_DOCS = 2
MIN_DOC_CHARS = 200  # shorter documents (after stripping whitespace) are dropped


def _hash(key: str) -> str:
    """sha256 hex digest of key: a platform-independent order, unlike Python's salted hash()."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def clean(docs: list[Doc]) -> list[Doc]:
    """Drop short documents and exact duplicate texts (keeping the first by id), so splits stay disjoint.

    Args:
        docs: Documents of every set, in any order.

    Returns:
        The kept documents, sorted by id.
    """
    seen: set[str] = set()
    kept = []
    for doc in sorted(docs, key=lambda d: d.doc_id):
        if len(doc.text.strip()) < MIN_DOC_CHARS or doc.text in seen:
            continue
        seen.add(doc.text)
        kept.append(doc)
    return kept


def split(docs: list[Doc]) -> dict[str, list[Doc]]:
    """Per set, the docs with the smallest id hashes go to validation; each split is ordered by id hash.

    Args:
        docs: Cleaned documents; their input order does not matter.

    Returns:
        ``{"train": [...], "validation": [...]}``; validation holds VALIDATION_FRACTION of each set
        (at least MIN_VALIDATION_DOCS), and each list is shuffled by sha256 of ``order/<doc id>``.
    """
    out: dict[str, list[Doc]] = {"train": [], "validation": []}
    for set_name in sorted({d.set_name for d in docs}):
        members = sorted((d for d in docs if d.set_name == set_name), key=lambda d: _hash(d.doc_id))
        n_val = max(MIN_VALIDATION_DOCS, round(VALIDATION_FRACTION * len(members)))
        out["validation"] += members[:n_val]
        out["train"] += members[n_val:]
    for name in out:  # mix the sets within each file, as SlimPajama is shuffled
        out[name].sort(key=lambda d: _hash("order/" + d.doc_id))
    return out
