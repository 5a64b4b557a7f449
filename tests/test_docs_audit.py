"""What the user-facing docs promise about the scripts' printed output, checked on the real commands."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from scripts import prepare_corpus


def test_prepare_corpus_summary_names_the_prefix(tmp_path: Path):
    """README's "your own data" steps prepare the validation folder with ``--prefix validation`` and no ``--split``:
    the summary line must name what was written (``validation: ...``), not the default split ``train``, which
    reads as if training data had been prepared."""
    src = tmp_path / "val"
    src.mkdir()
    (src / "license.txt").write_text("Permission is hereby granted, free of charge, to any person.\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = prepare_corpus.main(["--source_path", str(src), "--destination_path", str(tmp_path / "shards"),
                                    "--prefix", "validation", "--num_workers", "1"])
    assert code == 0
    line = out.getvalue().strip()
    assert line.startswith("validation: 1 files, 1 documents, "), line
    assert line.endswith(f"1 shards in {tmp_path / 'shards'}"), line
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "validation_000000_0000000000.bin", "validation_manifest.json"]
