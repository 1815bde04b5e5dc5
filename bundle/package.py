"""Builds the model-zoo archive ``<name>_v<version>.zip`` of this bundle and prints its sha256.

The archive has the zoo layout, one top folder named after the bundle::

    lvm_med/
        LICENSE  large_files.yml
        configs/  metadata.json, inference.json, ...
        docs/     README.md, data_license.txt, ...
        models/   model.pt, the served weights (``make model``); other weights are fetched by
                  ``monai.bundle download_large_files`` from ``large_files.yml``
        scripts/  the Python code the configs import

The served weights ``models/model.pt`` travel in the archive, as in the model zoo's release archives (there is no
URL to fetch them from): packing refuses to run without them unless ``large_files.yml`` lists them. Every other
weight file is left out; ``large_files.yml`` names where it comes from.

Before writing, it checks that ``metadata.json``'s ``version`` has an entry in its ``changelog``, that
``large_files.yml`` is well formed (and that local copies of the listed files match their digests), and that no file
other than the weights is larger than ``max_file_mb``. Entries without a digest (the official LVM-Med files, whose
sha256 nobody has recorded yet: this workplace is offline) are packed with a warning naming them, as MONAI's
``download_large_files`` fetches them with a warning; ``--require-hashes`` refuses them (for a release whose
digests are known). The archive is reproducible (sorted entries, fixed timestamps), so its sha256 identifies it.

Usage (the archive's name comes from ``metadata.json``: ``<name>_v<version>.zip``)::

    make model                                            # models/model.pt, if not there yet
    python -m bundle.package --output-dir dist            # -> dist/lvm_med_v0.2.0.zip and its sha256
    python -m monai.bundle download --name lvm_med --url file://$PWD/dist/lvm_med_v0.2.0.zip --bundle_dir bundles
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bundle.large_files import LARGE_FILES_NAME, LargeFilesError, check_large_files, file_digest, read_large_files
from scripts.atomic_save import write_atomically

__all__ = ["PackagingError", "PackageResult", "bundle_name", "bundle_version", "collect_files", "build_package"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# The zoo layout: everything else in the repository (tests, benchmarks, bundle/, virtual environments, runs, data)
# stays out of the archive.
TOP_LEVEL = ("LICENSE", LARGE_FILES_NAME, "configs", "docs", "models", "scripts")
EXCLUDED_NAMES = ("__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints", ".DS_Store", ".git*")
EXCLUDED_FILES = ("*.pyc", "*.pyo", ".tmp-*", "*.swp", "*~")
# The weights configs/inference.json serves: packed (uncompressed: weights do not deflate) unless large_files.yml
# lists them. Every other weight file reaches users through large_files.yml only, whatever its size.
SERVED_WEIGHTS = "models/model.pt"
WEIGHT_PATTERNS = ("*.pt", "*.pth", "*.torch", "*.ts", "*.onnx", "*.ckpt", "*.safetensors", "*.bin", "*.engine")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class PackagingError(ValueError):
    """The bundle cannot be packaged: bad metadata, a bad large-file list, or an unlisted large file."""


@dataclass(frozen=True)
class PackageResult:
    """The written archive, its sha256, the packed paths (relative to the bundle root, the served weights included),
    the weights left out and the ``large_files.yml`` entries without digest."""

    path: Path
    sha256: str
    files: tuple[str, ...]
    skipped_weights: tuple[str, ...]
    unhashed: tuple[str, ...] = ()


def _metadata(bundle_root: Path) -> dict:
    path = bundle_root / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise PackagingError(f"{path} does not exist: not a bundle root") from error
    except json.JSONDecodeError as error:
        raise PackagingError(f"{path} is not valid JSON: {error}") from error


def bundle_name(bundle_root: str | Path) -> str:
    """The zoo folder name: ``metadata.json``'s ``name`` in lower case with ``_`` separators (LVM-Med -> lvm_med)."""
    name = str(_metadata(Path(bundle_root)).get("name", ""))
    folder = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    if not folder:
        raise PackagingError(f"{Path(bundle_root) / 'configs' / 'metadata.json'} has no usable 'name' ({name!r})")
    return folder


def bundle_version(bundle_root: str | Path) -> str:
    """``metadata.json``'s ``version``, which must be a key of its ``changelog``.

    Raises:
        PackagingError: no version, or a version the changelog does not describe.
    """
    metadata = _metadata(Path(bundle_root))
    version = str(metadata.get("version", ""))
    changelog = metadata.get("changelog")
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise PackagingError(f"metadata.json version {version!r} is not of the form MAJOR.MINOR.PATCH")
    if not isinstance(changelog, dict) or version not in changelog:
        raise PackagingError(
            f"metadata.json version {version} has no entry in its changelog "
            f"({', '.join(changelog) if isinstance(changelog, dict) else 'no changelog'}): describe it before packaging"
        )
    return version


def _excluded(relative: Path) -> bool:
    if any(fnmatch.fnmatch(part, pattern) for part in relative.parts[:-1] for pattern in EXCLUDED_NAMES):
        return True
    return any(fnmatch.fnmatch(relative.name, pattern) for pattern in EXCLUDED_FILES + EXCLUDED_NAMES)


def collect_files(bundle_root: str | Path, max_file_mb: float = 25.0) -> tuple[list[str], list[str]]:
    """The files of the zoo layout under ``bundle_root`` and the weight files left out.

    Returns:
        (packed paths, skipped weight paths), relative POSIX paths, sorted.

    Raises:
        PackagingError: a file larger than ``max_file_mb`` that is not a weight (weights are always left out).
    """
    root = Path(bundle_root)
    packed, weights, too_large = [], [], []
    for top in TOP_LEVEL:
        start = root / top
        candidates = [start] if start.is_file() else sorted(p for p in start.rglob("*") if p.is_file())
        for path in candidates:
            relative = path.relative_to(root)
            if _excluded(relative):
                continue
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in WEIGHT_PATTERNS):
                weights.append(relative.as_posix())
            elif path.stat().st_size > max_file_mb * 2**20:
                too_large.append(f"{relative.as_posix()} ({path.stat().st_size / 2**20:.1f} MiB)")
            else:
                packed.append(relative.as_posix())
    if too_large:
        raise PackagingError(
            f"files over {max_file_mb} MiB would bloat the archive: {', '.join(too_large)}; "
            f"list them in {LARGE_FILES_NAME} (with url and sha256) instead"
        )
    return sorted(packed), sorted(weights)


def build_package(
    bundle_root: str | Path = REPO_ROOT,
    output_dir: str | Path = "dist",
    name: str | None = None,
    require_hashes: bool = False,
    max_file_mb: float = 25.0,
) -> PackageResult:
    """Checks the bundle and writes ``<output_dir>/<name>_v<version>.zip`` atomically.

    Args:
        bundle_root: the folder holding ``configs/metadata.json``.
        output_dir: where the archive is written (created if needed).
        name: the top folder and file-name stem; from ``metadata.json``'s ``name`` when None.
        require_hashes: refuse ``large_files.yml`` entries without ``hash_val`` (by default they are packed and
            reported in ``PackageResult.unhashed``: their downloads are not verified).
        max_file_mb: largest non-weight file accepted in the archive.

    Raises:
        PackagingError: see :func:`bundle_version`, :func:`collect_files`, ``large_files.yml`` problems, and
            ``models/model.pt`` neither present nor listed in ``large_files.yml``.

    Example::

        result = build_package(".", "dist")
        print(result.path, result.sha256)
    """
    root = Path(bundle_root).resolve()
    version = bundle_version(root)
    name = name or bundle_name(root)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
        raise PackagingError(f"bundle name {name!r} must be letters, digits and underscores")
    try:
        unhashed = check_large_files(root, allow_unhashed=not require_hashes)
        listed = {entry.path for entry in read_large_files(root)}
    except LargeFilesError as error:
        raise PackagingError(str(error)) from error
    packed, weights = collect_files(root, max_file_mb)
    packed = [path for path in packed if path not in listed]
    if SERVED_WEIGHTS not in listed:
        if SERVED_WEIGHTS not in weights:
            raise PackagingError(
                f"{root / SERVED_WEIGHTS} is missing: the archive carries the weights configs/inference.json serves; "
                "make them with `make model` (configs/train.json on the embedded data) or put your trained network's "
                f"state dict there (or list {SERVED_WEIGHTS} in {LARGE_FILES_NAME} with its url and sha256)"
            )
        weights.remove(SERVED_WEIGHTS)
        packed = sorted([*packed, SERVED_WEIGHTS])
    for required in ("configs/metadata.json", LARGE_FILES_NAME, "LICENSE"):
        if required not in packed:
            raise PackagingError(f"{root / required} is missing: the zoo layout needs it")

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for directory in sorted({str(Path(p).parent) for p in packed} | {"models"}):
                # explicit folder entries, so that empty ones (models/) exist after extraction
                info = zipfile.ZipInfo(f"{name}/" if directory == "." else f"{name}/{directory}/", _FIXED_TIME)
                info.external_attr = (0o40755 << 16) | 0x10
                archive.writestr(info, b"")
            for relative in packed:
                info = zipfile.ZipInfo(f"{name}/{relative}", _FIXED_TIME)
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_STORED if relative == SERVED_WEIGHTS else zipfile.ZIP_DEFLATED
                with archive.open(info, "w") as member, open(root / relative, "rb") as source:
                    shutil.copyfileobj(source, member, 1 << 20)

    archive_path = write_atomically(Path(output_dir) / f"{name}_v{version}.zip", write)
    return PackageResult(
        path=archive_path, sha256=file_digest(archive_path), files=tuple(packed), skipped_weights=tuple(weights),
        unhashed=tuple(entry.path for entry in unhashed),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle.package", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle-root", type=Path, default=REPO_ROOT, help="folder holding configs/metadata.json")
    parser.add_argument("--output-dir", type=Path, default=Path("dist"), help="where the zip is written")
    parser.add_argument("--name", default=None, help="bundle folder name (default: from metadata.json)")
    parser.add_argument("--require-hashes", action="store_true", help="refuse large_files.yml entries without hash_val")
    parser.add_argument("--max-file-mb", type=float, default=25.0, help="largest non-weight file packed")
    args = parser.parse_args(argv)
    try:
        result = build_package(args.bundle_root, args.output_dir, args.name, args.require_hashes, args.max_file_mb)
    except PackagingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in result.unhashed:
        print(f"warning: {LARGE_FILES_NAME} has no sha256 for {path}: its download is not verified "
              "(record it with python -m bundle.large_files --record once the file is in place)", file=sys.stderr)
    for path in result.skipped_weights:
        print(f"left out weight file {path} (fetched through {LARGE_FILES_NAME})", file=sys.stderr)
    print(f"{result.path}: {len(result.files)} files")
    print(f"sha256 {result.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
