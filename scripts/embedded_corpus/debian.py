"""Pinned Debian packages: download with ``apt-get download`` and unpack with ``dpkg-deb -x``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Pinned so that a rebuild reads the same bytes. Debian's security archive only keeps the newest point release:
# if a pinned version is gone, pass --any_version (and commit the new corpus, tokenizer and SOURCES.md together).
PACKAGES = {
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",  # only its `bible` decoder is used; none of its files enter the corpus
    "python3.11-doc": "3.11.2-6+deb12u9",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
}


def fetch_packages(deb_dir: Path, any_version: bool) -> dict[str, str]:
    """Download the pinned .deb files into deb_dir, unless already there.

    Args:
        deb_dir: Folder for (or with already downloaded) .deb files.
        any_version: Accept whatever version apt offers instead of the pinned one.

    Returns:
        Package name -> version of the .deb file found or downloaded.
    """
    versions = {}
    for pkg, version in PACKAGES.items():
        if not list(deb_dir.glob(f"{pkg}_*.deb")):
            _apt_download(pkg if any_version else f"{pkg}={version}", deb_dir)
        (deb,) = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        versions[pkg] = _deb_field(deb, "Version")
        if versions[pkg] != version and not any_version:
            sys.exit(
                f"error: {deb} is version {versions[pkg]}, expected {version}; pass --any_version to accept it"
            )
    return versions


def _apt_download(spec: str, deb_dir: Path) -> None:
    """Run `apt-get download spec` in deb_dir; runs `apt-get update` once if the lists lack it.

    Args:
        spec: ``package`` or ``package=version``.
        deb_dir: Folder the .deb file is written to.
    """
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", spec], cwd=deb_dir, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if attempt == 0:
            print("apt-get download failed; running apt-get update once", flush=True)
            subprocess.run(["apt-get", "update"], check=True, capture_output=True)
    sys.exit(f"error: `apt-get download {spec}` failed: {done.stderr.strip()}; try --any_version")


def _deb_field(deb: Path, field: str) -> str:
    """One control field (e.g. ``Version``) of a .deb file, via ``dpkg-deb -f``."""
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def unpack(deb_dir: Path, root: Path) -> None:
    """Unpack every pinned package into root/<package>.

    Args:
        deb_dir: Folder holding one .deb file per pinned package.
        root: Folder to unpack into.
    """
    for pkg in PACKAGES:
        (deb,) = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / pkg)], check=True)
