"""Reading and checking ``large_files.yml``, the model-zoo list of weights that are downloaded, not shipped.

The schema is the one ``python -m monai.bundle download_large_files`` reads::

    large_files:
      - path: "models/sam_vit_b_01ec64.pth"     # relative to the bundle root, inside it
        url: "https://..."                       # http(s), file:// or a Google Drive link (needs gdown)
        hash_type: "sha256"                      # one of monai.apps.utils.SUPPORTED_HASH_TYPES
        hash_val: "ec2d..."                      # hex digest; empty means "not verified" (MONAI warns)

Usage::

    python -m bundle.large_files --bundle-root .            # check the list (and any local copies)
    python -m bundle.large_files --bundle-root . --record   # write the digests of the local copies into it
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import yaml
from monai.apps.utils import SUPPORTED_HASH_TYPES

from scripts.atomic_save import write_atomically

__all__ = [
    "LARGE_FILES_NAME",
    "LargeFile",
    "LargeFilesError",
    "file_digest",
    "read_large_files",
    "check_large_files",
    "record_digests",
]

LARGE_FILES_NAME = "large_files.yml"
_DIGEST_LENGTHS = {name: factory().digest_size * 2 for name, factory in SUPPORTED_HASH_TYPES.items()}
_URL_SCHEMES = ("http", "https", "file")


class LargeFilesError(ValueError):
    """``large_files.yml`` is malformed, or a local copy of a listed file does not match its digest."""


@dataclass(frozen=True)
class LargeFile:
    """One entry of ``large_files.yml``; ``hash_val`` is ``""`` when the digest is not known yet."""

    path: str
    url: str
    hash_type: str
    hash_val: str


def file_digest(path: str | Path, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = SUPPORTED_HASH_TYPES[hash_type]()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(raw: object, index: int, source: Path) -> LargeFile:
    where = f"{source}: large_files[{index}]"
    if not isinstance(raw, dict):
        raise LargeFilesError(f"{where} must be a mapping with path, url, hash_type, hash_val, got {raw!r}")
    unknown = sorted(set(raw) - {"path", "url", "hash_type", "hash_val"})
    if unknown:
        raise LargeFilesError(f"{where} has unknown keys {unknown}")
    path, url = str(raw.get("path", "")), str(raw.get("url", ""))
    hash_type, hash_val = str(raw.get("hash_type") or "sha256").lower(), str(raw.get("hash_val") or "").lower()
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise LargeFilesError(f"{where}: path {path!r} must be a relative path inside the bundle, without '..'")
    if urlparse(url).scheme not in _URL_SCHEMES:
        raise LargeFilesError(f"{where}: url {url!r} must be an {', '.join(_URL_SCHEMES)} URL")
    if hash_type not in SUPPORTED_HASH_TYPES:
        raise LargeFilesError(f"{where}: hash_type {hash_type!r} is not one of {sorted(SUPPORTED_HASH_TYPES)}")
    if hash_val and not re.fullmatch(f"[0-9a-f]{{{_DIGEST_LENGTHS[hash_type]}}}", hash_val):
        raise LargeFilesError(
            f"{where}: hash_val {hash_val!r} is not a {hash_type} digest ({_DIGEST_LENGTHS[hash_type]} hex digits)"
        )
    return LargeFile(path=path, url=url, hash_type=hash_type, hash_val=hash_val)


def read_large_files(bundle_root: str | Path) -> list[LargeFile]:
    """The entries of ``<bundle_root>/large_files.yml`` (an empty list when the file does not exist).

    Raises:
        LargeFilesError: the file is not valid YAML, or an entry is malformed or listed twice.
    """
    source = Path(bundle_root) / LARGE_FILES_NAME
    if not source.is_file():
        return []
    try:
        content = yaml.safe_load(source.read_text())
    except yaml.YAMLError as error:
        raise LargeFilesError(f"{source} is not valid YAML: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("large_files"), list):
        raise LargeFilesError(f"{source} must hold a mapping with a 'large_files' list")
    entries = [_entry(raw, index, source) for index, raw in enumerate(content["large_files"])]
    paths = [entry.path for entry in entries]
    twice = sorted({path for path in paths if paths.count(path) > 1})
    if twice:
        raise LargeFilesError(f"{source} lists {twice} more than once")
    return entries


def check_large_files(bundle_root: str | Path, allow_unhashed: bool = False) -> list[LargeFile]:
    """Checks ``large_files.yml``: well formed, every digest known (unless ``allow_unhashed``), and every local
    copy of a listed file (at ``<bundle_root>/<path>``) matching its digest.

    Returns:
        the entries whose digest is not known yet (empty unless ``allow_unhashed``).

    Raises:
        LargeFilesError: a malformed entry, a missing digest, or a local copy with another digest.
    """
    root = Path(bundle_root)
    entries = read_large_files(root)
    unhashed = [entry for entry in entries if not entry.hash_val]
    if unhashed and not allow_unhashed:
        raise LargeFilesError(
            f"{root / LARGE_FILES_NAME} has no hash_val for {', '.join(e.path for e in unhashed)}: downloads of them "
            "would not be verified (record the digests with python -m bundle.large_files --record once the files "
            "are in place)"
        )
    for entry in entries:
        local = root / entry.path
        if entry.hash_val and local.is_file() and file_digest(local, entry.hash_type) != entry.hash_val:
            raise LargeFilesError(
                f"{local} does not match its {entry.hash_type} in {LARGE_FILES_NAME} ({entry.hash_val}): "
                "a stale list or a modified file"
            )
    return unhashed


def record_digests(bundle_root: str | Path) -> list[str]:
    """Writes the digests of the listed files present under ``bundle_root`` into ``large_files.yml``.

    Returns:
        the paths whose digest was written.
    """
    root = Path(bundle_root)
    entries = read_large_files(root)
    recorded, rows = [], []
    for entry in entries:
        local = root / entry.path
        hash_val = entry.hash_val
        if local.is_file():
            hash_val = file_digest(local, entry.hash_type)
            recorded.append(entry.path)
        rows.append({"path": entry.path, "url": entry.url, "hash_type": entry.hash_type, "hash_val": hash_val})
    text = yaml.safe_dump({"large_files": rows}, sort_keys=False, width=200)
    write_atomically(root / LARGE_FILES_NAME, lambda temporary: temporary.write_text(text))
    return recorded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle.large_files", description="Check large_files.yml.")
    parser.add_argument("--bundle-root", type=Path, default=Path("."), help="folder holding large_files.yml")
    parser.add_argument("--record", action="store_true", help="write the digests of the local copies")
    parser.add_argument("--allow-unhashed", action="store_true", help="accept entries without hash_val")
    args = parser.parse_args(argv)
    try:
        if args.record:
            print("recorded:", ", ".join(record_digests(args.bundle_root)) or "nothing (no listed file present)")
        unhashed = check_large_files(args.bundle_root, args.allow_unhashed)
    except LargeFilesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for entry in unhashed:
        print(f"warning: {entry.path} has no hash_val; its download is not verified", file=sys.stderr)
    print(f"{LARGE_FILES_NAME}: {len(read_large_files(args.bundle_root))} entries checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
