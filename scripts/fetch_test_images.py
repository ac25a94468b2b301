#!/usr/bin/env python3
"""Fetch the real test images (Testing/realdata) from package registries into Testing/data/cache/.

Idempotent: a file already in the cache with the SHA-256 recorded below is kept as is, and a package
is downloaded only when one of its files is missing or wrong. Needs no root: wheels come through the
running interpreter's ``pip download`` and the Debian package through ``apt-get download`` (run in a
temporary folder) and ``dpkg-deb --fsys-tarfile``. Only the listed files are extracted; the archives
are deleted. Exit status 0 when every file is in the cache and verified, 1 otherwise (each failure
says what to do).

    python scripts/fetch_test_images.py [--cache DIR]

Testing/data/README.md describes each file, its source package and version, licence and SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "Testing" / "data" / "cache"


@dataclass(frozen=True)
class Member:
    """One file to extract: its path inside the archive, its name in the cache, its SHA-256."""

    archive_path: str
    name: str
    sha256: str


@dataclass(frozen=True)
class Source:
    """A package holding some of the files: ``kind`` is ``pip`` (a wheel) or ``apt`` (a Debian package)."""

    kind: str
    package: str
    version: str
    members: tuple[Member, ...]

    @property
    def label(self) -> str:
        return f"{self.package} {self.version} ({'PyPI wheel' if self.kind == 'pip' else 'Debian package'})"


SOURCES: tuple[Source, ...] = (
    Source(
        "pip",
        "nilearn",
        "0.14.1",
        (
            Member(
                "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
            ),
            Member(
                "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
            ),
            Member(
                "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
            ),
        ),
    ),
    Source(
        "apt",
        "mricron-data",
        "1.2.20211006+dfsg-4",
        (
            Member(
                "./usr/share/mricron/templates/ch2.nii.gz",
                "ch2.nii.gz",
                "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
            ),
            Member(
                "./usr/share/mricron/templates/aal.nii.gz",
                "aal.nii.gz",
                "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
            ),
            Member(
                "./usr/share/mricron/templates/aal.nii.txt",
                "aal.nii.txt",
                "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e",
            ),
            Member(
                "./usr/share/mricron/templates/aal.nii.lut",
                "aal.nii.lut",
                "e928e245287617b46637d3be52f195cefb19dc5d65a2608c9cd78f941fd7461a",
            ),
        ),
    ),
    Source(
        "pip",
        "totalsegmentator",
        "2.18.0",
        (
            Member(
                "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",
                "ct_brain_atlas_1mm.nii.gz",
                "e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265",
            ),
        ),
    ),
    Source(
        "pip",
        "pydicom-data",
        "1.0.0",
        (
            Member(
                "data_store/data/liver.dcm",
                "liver.dcm",
                "4f8fb316b6df067bdf2ef7bc2385fd571ad5be67e171aed3ed902a71293d9d5c",
            ),
        ),
    ),
)


class FetchError(RuntimeError):
    """A source could not be fetched or did not hold the expected files."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], cwd: Path, what: str, hint: str) -> bytes:
    """Run ``command`` in ``cwd``; its stdout, or :class:`FetchError` with the last lines of its messages."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(f"{what}: {command[0]} not found. {hint}") from exc
    if result.returncode != 0:
        messages = (result.stderr or result.stdout).decode(errors="replace").splitlines()
        detail = [ln.strip() for ln in messages if ln.strip() and "is ignored" not in ln]
        raise FetchError(f"{what} failed (exit {result.returncode}): {' | '.join(detail[-3:])}. {hint}")
    return result.stdout


def _download_wheel(source: Source, folder: Path) -> dict[str, bytes]:
    requirement = f"{source.package}=={source.version}"
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
        + ["--quiet", "--dest", str(folder), requirement],
        folder,
        f"pip download {requirement}",
        "Check that PyPI is reachable (or a pip index / proxy is configured for this interpreter).",
    )
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {requirement} left no wheel in {folder}")
    wanted = {m.archive_path for m in source.members}
    found: dict[str, bytes] = {}
    with zipfile.ZipFile(wheels[0]) as archive:
        for name in archive.namelist():
            if name in wanted:
                found[name] = archive.read(name)
    return found


def _apt_download(source: Source, folder: Path) -> None:
    hint = "Needs apt-get with the Debian package lists present (as root, run `apt-get update` once)."
    sandbox = ["-o", "APT::Sandbox::User=root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    try:
        _run(["apt-get", *sandbox, "download", f"{source.package}={source.version}"], folder, "apt-get download", hint)
    except FetchError as pinned_error:
        # Another Debian release may carry another revision of the same data; the SHA-256 of every
        # extracted file is still checked, so only identical files are accepted.
        try:
            _run(["apt-get", *sandbox, "download", source.package], folder, "apt-get download", hint)
        except FetchError:
            raise pinned_error from None
        print(f"note     {source.package}={source.version} not in the package lists; trying the available version")


def _download_deb(source: Source, folder: Path) -> dict[str, bytes]:
    _apt_download(source, folder)
    debs = sorted(folder.glob(f"{source.package}_*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {source.package} left no .deb in {folder}")
    hint = "Needs dpkg-deb (Debian, Ubuntu)."
    stream = _run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], folder, "dpkg-deb --fsys-tarfile", hint)
    wanted = {m.archive_path for m in source.members}
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        for info in archive:
            if info.name in wanted and info.isfile():
                extracted = archive.extractfile(info)
                if extracted is not None:
                    found[info.name] = extracted.read()
    return found


def fetch_source(source: Source, cache: Path) -> list[str]:
    """Make every file of ``source`` present and verified in ``cache``; returns one line per file."""
    missing = [m for m in source.members if not (cache / m.name).is_file() or sha256_of(cache / m.name) != m.sha256]
    lines = [f"cached   {m.name:<52} {source.label}" for m in source.members if m not in missing]
    if not missing:
        return lines
    with tempfile.TemporaryDirectory(prefix="deepseg-fetch-") as tmp:
        folder = Path(tmp)
        found = _download_wheel(source, folder) if source.kind == "pip" else _download_deb(source, folder)
        for member in missing:
            data = found.get(member.archive_path)
            if data is None:
                raise FetchError(f"{source.label} does not contain {member.archive_path}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != member.sha256:
                raise FetchError(
                    f"{member.archive_path} from {source.label} has SHA-256 {digest}, expected {member.sha256}; "
                    "the package changed upstream: check the file and update the script and Testing/data/README.md"
                )
            target = cache / member.name
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(data)
            partial.replace(target)
            lines.append(f"fetched  {member.name:<52} {source.label}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in SOURCES:
        try:
            for line in fetch_source(source, cache):
                print(line, flush=True)
        except (FetchError, OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
            failures.append(f"{source.label}: {exc}")
            for member in source.members:
                print(f"FAILED   {member.name:<52} {source.label}", flush=True)
    if failures:
        print("\nCould not fetch every test image:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
