"""The wheels ``benchmarks.gpu_check`` needs on a lent GPU machine, which has no network and only its own image.

``python -m benchmarks.gpu_wheels [--dest .gpu-wheels]`` (``make gpu-wheels``) downloads, here, the CPython 3.12
manylinux wheels of :data:`WHEELS` (each pinned to ``requirements.txt``, else to the version installed here),
with ``--no-deps --only-binary=:all:``, into an ignored folder that the device tool carries with the working
tree (64 MiB in all); ``bash benchmarks/gpu_check.sh`` installs them there with ``--no-index --no-deps``.

The GPU image was last seen with Python 3.12 and :data:`GPU_IMAGE` installed (its own CUDA build of torch,
2.11), hence with what those declare as dependencies (:func:`image_distributions`, read from the metadata
installed here). ``tests/test_gpu_check.py`` checks that :data:`WHEELS` is exactly what the check imports
beyond that: nothing missing, nothing carried for nothing (ITK, for one, is not imported by the check).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

__all__ = ["GPU_IMAGE", "NOT_SURE_ON_IMAGE", "PLATFORMS", "WHEELS", "image_distributions", "normalise", "pins", "download"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# What the lent GPU machine has (issue 23): Python 3.12, its own torch and these, with their dependencies.
GPU_IMAGE = ("torch", "numpy", "scipy", "numba", "onnx", "onnxruntime", "tensorboard", "torch-geometric")

# Imported by the check, but on the image only as a dependency that older releases of GPU_IMAGE's packages do
# not declare: pillow (scripts/data/embedded.py) comes with tensorboard from 2.20 on; 2.19 does not require it.
NOT_SURE_ON_IMAGE = ("pillow",)

# What the check imports beyond what the image surely has (tests/test_gpu_check.py derives it from a run and
# compares).
WHEELS = (
    "monai",
    "pytorch-ignite",
    "nibabel",
    "pydicom",
    "pillow",
)

PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# the environment markers of the GPU machine, to follow conditional dependencies
_MARKERS = {"python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` -> ``pyyaml``, ``typing_extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions(roots: tuple[str, ...] = GPU_IMAGE) -> set[str]:
    """What the GPU image surely has: ``roots`` and every distribution they require (transitively, no extras), as
    installed here, less :data:`NOT_SURE_ON_IMAGE`; normalised.

    A requirement that is not installed here is kept by name (the GPU image has it) without following it.
    """
    found: set[str] = set()
    pending = [normalise(name) for name in roots]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(_MARKERS):
                pending.append(normalise(requirement.name))
    return found - {normalise(name) for name in NOT_SURE_ON_IMAGE}


def pins(names: tuple[str, ...] = WHEELS, requirements: Path = REPO_ROOT / "requirements.txt") -> list[str]:
    """``name==version`` for each name: the pin of ``requirements``, else the version installed here."""
    pinned = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pinned[normalise(name)] = version.strip()
    result = []
    for name in names:
        version = pinned.get(normalise(name))
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError as error:
                raise ValueError(f"{name}: neither pinned in {requirements} nor installed here") from error
        result.append(f"{name}=={version}")
    return result


def download(destination: Path) -> list[Path]:
    """Downloads the wheels of :func:`pins` into ``destination`` (after removing any other wheel there: an earlier
    list's or version's, which ``--no-index`` would install beside them) and returns their paths."""
    destination.mkdir(parents=True, exist_ok=True)
    wanted = dict(pin.split("==") for pin in pins())
    wanted = {normalise(name): version for name, version in wanted.items()}
    for wheel in destination.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if wanted.get(normalise(name)) != version:
            wheel.unlink()
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--dest", str(destination)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + pins(), check=True)
    return sorted(destination.glob("*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / ".gpu-wheels", help="folder of the wheels")
    args = parser.parse_args()
    wheels = download(args.dest)
    total = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:6.2f} MiB in {len(wheels)} wheels under {args.dest} (the device tool carries up to 64 MiB)")


if __name__ == "__main__":
    main()
