"""The document record every source reader produces and the split and writers consume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Doc:
    """One corpus document before the split.

    Attributes:
        doc_id: Stable identifier (source path or book/chapter range); it orders and splits the corpus.
        set_name: SlimPajama ``redpajama_set_name`` label.
        text: The document text, written unchanged.
    """

    doc_id: str
    set_name: str
    text: str
