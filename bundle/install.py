"""Installs a bundle archive from a URL after checking its sha256 and every path inside it.

``python -m monai.bundle download --url ...`` fetches an archive without a digest. This installer is the checked
path: the archive is fetched with :func:`monai.apps.utils.download_url` (``hash_val`` verified before the file is
moved into place), each member is checked (relative, no ``..``, no link, inside the ``<name>/`` folder) before
anything is written, and :func:`monai.apps.utils.extractall` (which re-checks each member) extracts it.

Usage::

    python -m bundle.install --url file:///path/lvm_med_v<version>.zip --sha256 <digest> --bundle-dir bundles
    python -m monai.bundle download_large_files --bundle_path bundles/lvm_med
"""

from __future__ import annotations

import argparse
import stat
import sys
import zipfile
from pathlib import Path, PurePosixPath

from monai.apps.utils import download_url, extractall

__all__ = ["UnsafeArchiveError", "check_archive_members", "install_bundle"]


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside its folder, or is a link."""


def check_archive_members(archive: str | Path, name: str) -> list[str]:
    """Checks every member of the zip ``archive`` before extraction.

    Returns:
        the member names.

    Raises:
        UnsafeArchiveError: an absolute path, a ``..`` component, a backslash, a symbolic link, or a member outside
            the top folder ``name/`` (the zoo layout); the message names the member.
        zipfile.BadZipFile: not a zip file.
    """
    with zipfile.ZipFile(archive) as opened:
        members = opened.infolist()
    for member in members:
        path = PurePosixPath(member.filename)
        if path.is_absolute() or ".." in path.parts or "\\" in member.filename or ":" in path.parts[0]:
            raise UnsafeArchiveError(f"{archive}: member {member.filename!r} would be written outside the bundle")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise UnsafeArchiveError(f"{archive}: member {member.filename!r} is a symbolic link")
        if path.parts[0] != name:
            raise UnsafeArchiveError(f"{archive}: member {member.filename!r} is not inside the top folder {name}/")
    return [member.filename for member in members]


def install_bundle(url: str, name: str, bundle_dir: str | Path, sha256: str) -> Path:
    """Downloads ``url`` to ``<bundle_dir>/<name>.zip``, verifies ``sha256``, checks and extracts it.

    Returns:
        the installed bundle folder ``<bundle_dir>/<name>``.

    Raises:
        monai.apps.utils.HashCheckError: the download does not match ``sha256`` (nothing is kept).
        UnsafeArchiveError: see :func:`check_archive_members` (nothing is extracted).
        FileExistsError: ``<bundle_dir>/<name>`` already exists and is not empty.
    """
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / name
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} already exists; remove it to install {url} again")
    archive = bundle_dir / f"{name}.zip"
    archive.unlink(missing_ok=True)  # download_url would trust an existing file with the same name
    download_url(url=url, filepath=archive, hash_val=sha256, hash_type="sha256", progress=False)
    check_archive_members(archive, name)
    extractall(filepath=archive, output_dir=bundle_dir, has_base=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle.install", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http(s):// or file:// URL of <name>_v<version>.zip")
    parser.add_argument("--sha256", required=True, help="digest printed by python -m bundle.package")
    parser.add_argument("--bundle-dir", type=Path, default=Path("bundles"), help="where the bundle folder goes")
    parser.add_argument("--name", default="lvm_med", help="bundle folder name (the archive's top folder)")
    args = parser.parse_args(argv)
    try:
        target = install_bundle(args.url, args.name, args.bundle_dir, args.sha256)
    except (ValueError, OSError, zipfile.BadZipFile) as error:  # HashCheckError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"installed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
