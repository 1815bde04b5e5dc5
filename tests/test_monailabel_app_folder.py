"""The MONAI Label serving folder is made outside the repository (bundle/monailabel/app_folder.py), so that what
MONAI Label writes into the folder it serves (model/, lib/, logs/, bin/, train_runs/) never lands in the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bundle.monailabel.app_folder import APP_SOURCE, make_app_folder
from conftest import REPO_ROOT


def test_the_folder_holds_the_app_and_a_model_folder(tmp_path: Path) -> None:
    folder = make_app_folder(tmp_path / "label")
    assert folder == (tmp_path / "label").resolve()
    assert (folder / "main.py").read_bytes() == (APP_SOURCE / "main.py").read_bytes()
    assert (folder / "model").is_dir()
    (folder / "main.py").write_text("# stale copy\n")
    make_app_folder(folder)  # run again after editing the app: refreshed
    assert (folder / "main.py").read_bytes() == (APP_SOURCE / "main.py").read_bytes()


@pytest.mark.parametrize("inside", ["bundle/monailabel/app", "serving"])
def test_a_folder_inside_the_repository_is_refused(inside: str) -> None:
    target = REPO_ROOT / inside
    before = (target.exists(), (target / "model").exists())
    with pytest.raises(ValueError, match=r"^app folder .* is inside the repository"):
        make_app_folder(target)
    assert (target.exists(), (target / "model").exists()) == before


def test_the_command_line_as_documented(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bundle.monailabel.app_folder", str(tmp_path / "label")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"--app {(tmp_path / 'label').resolve()}" in done.stdout
    assert (tmp_path / "label" / "main.py").is_file()
