"""The separate virtual environment in which MONAI Label serves this bundle.

MONAI Label 0.8.5 pins numpy 1.26 (this bundle's environment has numpy 2) and builds SAM 2 from source, which
would pull a CUDA torch of several GB; so it gets its own environment, made once and reused:

* torch is pinned to the build already installed (``constraints.txt``) both for the install and for the
  isolated build of SAM 2 (``--build-constraint``, pip >= 25.3, hence the pip upgrade first);
* ``SAM2_BUILD_CUDA=0`` builds SAM 2 without its CUDA extension;
* torchvision comes from PyPI as a CUDA build, whose operators do not load against a CPU-only torch; where the
  CPU build was taken from a local wheel folder (this workplace's pip configuration), torch is replaced by PyPI's
  build of the same version (it runs on CPU too). About 7.5 GB in all;
* pydicom stays below 3 (with dicomweb-client and pynetdicom releases that accept it): pydicom-seg 0.4.1, imported
  when the server starts, reads ``pydicom._storage_sopclass_uids``, which pydicom 3 removed.

Usage::

    python -m bundle.monailabel.environment            # creates .venv-monailabel/ (about 3.8 GB, minutes)
    .venv-monailabel/bin/python -m monailabel.main start_server --app bundle/monailabel/app --studies <images> \
        --conf models lvm_med   # the launcher script `monailabel` would run the first `python` on PATH
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["MONAILABEL_VERSION", "REPO_ROOT", "DEFAULT_VENV", "venv_python", "ensure_monailabel_venv"]

MONAILABEL_VERSION = "0.8.5"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-monailabel"
_STAMP = ".monailabel-installed"
# Written into the stamp file: an environment made by another recipe is made again.
_RECIPE = f"monailabel=={MONAILABEL_VERSION}; pydicom<3; torch matching torchvision\n"


def venv_python(venv_dir: Path = DEFAULT_VENV) -> Path:
    """The interpreter of the MONAI Label environment."""
    return Path(venv_dir) / "bin" / "python"


def _installed_version(python: Path, package: str) -> str:
    """The version of ``package`` installed for ``python``."""
    done = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True, text=True, check=True,
    )
    return done.stdout.strip()


def ensure_monailabel_venv(venv_dir: Path = DEFAULT_VENV, constraints: Path = REPO_ROOT / "constraints.txt") -> Path:
    """Creates ``venv_dir`` with MONAI Label and this bundle's runtime packages unless it is already complete.

    Returns:
        the environment's python interpreter.

    Raises:
        subprocess.CalledProcessError: a pip step failed (its output is on stderr).
    """
    venv_dir = Path(venv_dir)
    python = venv_python(venv_dir)
    stamp = venv_dir / _STAMP
    if python.is_file() and stamp.is_file() and stamp.read_text() == _RECIPE:
        return python
    if not python.is_file():
        venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
    subprocess.run([*pip, "--upgrade", "pip>=25.3"], check=True)
    env = {**os.environ, "SAM2_BUILD_CUDA": "0"}
    packages = [
        f"monailabel=={MONAILABEL_VERSION}",
        "pydicom>=2.4.4,<3",
        "dicomweb-client<0.60",
        "pynetdicom<2.1",
        "torch",
        "pytorch-ignite",
        "fire",
        "pyyaml",
    ]
    subprocess.run([*pip, "--build-constraint", str(constraints), *packages], check=True, env=env)
    if subprocess.run([str(python), "-c", "import torchvision.utils"], capture_output=True).returncode:
        # PyPI's torch, not a local CPU wheel: pip's configuration files (find-links) are left out for this step.
        pypi_only = {key: value for key, value in env.items() if key != "PIP_FIND_LINKS"}
        pypi_only["PIP_CONFIG_FILE"] = os.devnull
        torch_pin = f"torch=={_installed_version(python, 'torch').split('+')[0]}"
        subprocess.run([*pip[:-2], "--no-deps", "--force-reinstall", torch_pin], check=True, env=pypi_only)
        subprocess.run([*pip[:-2], torch_pin, "numpy<2", "pydicom<3"], check=True, env=pypi_only)
        subprocess.run([str(python), "-c", "import torchvision.utils"], check=True)
    stamp.write_text(_RECIPE)
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where to create the environment")
    args = parser.parse_args(argv)
    print(ensure_monailabel_venv(args.venv))


if __name__ == "__main__":
    main(sys.argv[1:])
