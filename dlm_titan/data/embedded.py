"""``data.path = ""``: the embedded corpus, tokenized on first use into a cache folder.

The cache folder is ``$DLM_TITAN_CACHE`` (default ``~/.cache/dlm_titan``) ``/embedded-<hash>``, the hash
covering the corpus bytes, the tokenizer bytes and the preparation settings, so a changed corpus or tokenizer
gets a fresh folder. It is built by the same :func:`prepare_split` as scripts/prepare_slim_pajama, in a
temporary folder that is renamed into place when complete (announced by one line on stderr and a progress
bar); an exclusive file lock makes concurrent ranks wait for the first one instead of preparing twice (and the
rename keeps it safe where locks do not work).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dlm_titan.errors import UserError

from .prepare import prepare_split
from .tokenizer import resolve_tokenizer_path

# A few-MB corpus: 64 windows of 2049 tokens per shard keeps several shards per split.
EMBEDDED_CHUNK_SIZE = 2049 * 64
_PREPARE_VERSION = 1  # bump when prepare_split's output for the same inputs changes


def embedded_corpus_dir() -> Path:
    """The shipped corpus folder (SlimPajama layout), or UserError if this install lacks it."""
    try:
        from dlm_titan.assets import EMBEDDED_CORPUS_DIR
    except ImportError:
        EMBEDDED_CORPUS_DIR = Path(__file__).resolve().parents[1] / "assets" / "corpus"
    path = Path(EMBEDDED_CORPUS_DIR)
    if not (path / "train").is_dir():
        raise UserError(f"the embedded corpus ({path}) is missing from this install; set data.path to a folder "
                        "of shards made by scripts/prepare_slim_pajama")
    return path


def _fingerprint(corpus: Path, tokenizer: str) -> str:
    h = hashlib.sha256(f"v{_PREPARE_VERSION} chunk{EMBEDDED_CHUNK_SIZE}".encode())
    for split in ("train", "validation"):
        for p in sorted((corpus / split).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(corpus)).encode())
                h.update(p.read_bytes())
    h.update(Path(tokenizer).read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """``$DLM_TITAN_CACHE`` or ``~/.cache/dlm_titan``."""
    return Path(os.environ.get("DLM_TITAN_CACHE") or Path.home() / ".cache" / "dlm_titan")


def prepare_embedded(tokenizer_path: str = "") -> Path:
    """Shards of the embedded corpus (train and validation) for ``tokenizer_path``; built once, then cached."""
    corpus = embedded_corpus_dir()
    tokenizer = resolve_tokenizer_path(tokenizer_path)
    root = cache_root()
    final = root / f"embedded-{_fingerprint(corpus, tokenizer)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second rank waits here, then finds the folder done
        except OSError:  # no flock on this file system (Lustre/NFS: ENOSYS, ENOLCK): the rename alone keeps it safe
            pass
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=root))
        # Tokenizing takes a while on a laptop: say what happens (once per corpus and tokenizer) with a bar.
        print(f"first use of the embedded corpus with this tokenizer: tokenizing it into {final} "
              "(once; later runs reuse it)", file=sys.stderr, flush=True)
        try:
            for split in ("train", "validation"):
                if (corpus / split).is_dir():
                    prepare_split(str(corpus), tokenizer, str(tmp), split, chunk_size=EMBEDDED_CHUNK_SIZE,
                                  num_workers=1, show_progress=True)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another node won the rename race if it is there now
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_data_path(data_cfg: Any) -> str:
    """The shard folder of a ``data`` config section: ``data.path``, or the prepared embedded corpus for ""."""
    if data_cfg.path:
        if not os.path.isdir(data_cfg.path):
            raise UserError(f"data.path {data_cfg.path} is not a folder; point it at a folder of .bin shards "
                            "(or set \"\" for the embedded corpus)")
        return str(data_cfg.path)
    return str(prepare_embedded(data_cfg.tokenizer_path))
