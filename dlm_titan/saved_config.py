"""The run config a dump folder records: its ``config.toml`` (written by the trainer) read back as nested dicts.

The readers of a finished or interrupted run (resume checks, the validation-coverage warning, export, plotting)
take its settings from here rather than each parsing the file. Ground level: imports nothing from the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RUN_CONFIG_FILE = "config.toml"


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file ``path`` as nested dicts.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not UTF-8 TOML (UnicodeDecodeError and tomllib.TOMLDecodeError are ValueErrors).
    """
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))


def saved_config(dump_folder: str | Path) -> dict[str, Any]:
    """The config the dump folder's config.toml records; {} where there is none or it cannot be read (a reader
    then falls back to the defaults, as for a run that recorded nothing)."""
    try:
        return read_toml(Path(dump_folder) / RUN_CONFIG_FILE)
    except (OSError, ValueError):
        return {}
