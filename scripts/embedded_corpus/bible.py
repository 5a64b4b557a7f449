"""The King James Bible (``bible-kjv-text``, decoded by ``bible -f``) as documents of a few chapters each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from scripts.embedded_corpus.doc import Doc

CHAPTERS_PER_BIBLE_DOC = 5

# fmt: off
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah",
    "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter",
    "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)
# fmt: on


def bible_docs(root: Path) -> list[Doc]:
    """The KJV as documents of CHAPTERS_PER_BIBLE_DOC chapters each, with book and chapter headings.

    Args:
        root: Folder with the unpacked ``bible-kjv`` and ``bible-kjv-text`` packages.

    Returns:
        The documents in canonical book and chapter order.
    """
    return verse_docs(_read_kjv(root))


def verse_docs(verses: list[tuple[int, int, int, str]]) -> list[Doc]:
    """Group verses into documents of CHAPTERS_PER_BIBLE_DOC chapters of one book.

    Args:
        verses: (book index into KJV_BOOKS, chapter, verse, text) per verse, in reading order.

    Returns:
        Per book, one document per group of chapters: a ``Book C`` heading and ``verse text`` lines per
        chapter, chapters separated by a blank line.
    """
    by_chapter: dict[tuple[int, int], list[str]] = {}
    for book, chapter, verse, text in verses:
        by_chapter.setdefault((book, chapter), []).append(f"{verse} {text}")
    docs = []
    for book, name in enumerate(KJV_BOOKS):
        chapters = sorted(c for b, c in by_chapter if b == book)
        for start in range(0, len(chapters), CHAPTERS_PER_BIBLE_DOC):
            group = chapters[start : start + CHAPTERS_PER_BIBLE_DOC]
            parts = [f"{name} {c}\n\n" + "\n".join(by_chapter[(book, c)]) for c in group]
            doc_id = f"kjv/{book + 1:02d}-{name}/{group[0]:03d}-{group[-1]:03d}"
            docs.append(Doc(doc_id, "RedPajamaBook", "\n\n".join(parts) + "\n"))
    return docs


def _read_kjv(root: Path) -> list[tuple[int, int, int, str]]:
    """(book index, chapter, verse, text) for every verse, via `bible -f Gen1:1-Rev22:21`."""
    exe = root / "bible-kjv/usr/bin/bible"
    data_dir = root / "bible-kjv-text/usr/lib"
    done = subprocess.run([str(exe), "-f", "-p", str(data_dir), "Gen1:1-Rev22:21"], capture_output=True)
    if done.returncode != 0:
        sys.exit(f"error: {exe} failed ({done.stderr.decode().strip()}); it needs libreadline8 installed")
    verses = parse_verses(done.stdout.decode("ascii"))
    n_books = len({book for book, _, _, _ in verses})
    assert n_books == len(KJV_BOOKS) and len(verses) == 31102, (n_books, len(verses))
    return verses


def parse_verses(listing: str) -> list[tuple[int, int, int, str]]:
    """Parse the output of `bible -f`: one ``AbbrevC:V text`` line per verse; blank lines are skipped.

    Args:
        listing: The decoder's output, e.g. ``"Gen1:1 In the beginning ..."``.

    Returns:
        (book index, chapter, verse, text) per verse; the book index counts changes of abbreviation.
    """
    pattern = re.compile(r"^(\w+?)(\d+):(\d+) (.*)$")
    abbrevs: list[str] = []
    verses = []
    for line in listing.splitlines():
        if not line.strip():
            continue
        abbrev, chapter, verse, text = pattern.match(line).groups()
        if not abbrevs or abbrevs[-1] != abbrev:
            abbrevs.append(abbrev)
        verses.append((len(abbrevs) - 1, int(chapter), int(verse), text.strip()))
    return verses
