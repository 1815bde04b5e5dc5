"""The folder MONAI Label serves this app from, outside the repository, so that serving leaves ``git status`` clean.

MONAI Label 0.8.5's ``start_server --app DIR`` creates ``DIR/model``, ``DIR/lib``, ``DIR/logs`` and ``DIR/bin``
(``monailabel.main.Main.start_server_init_settings``) and writes its log to ``DIR/logs/app.log``
(``init_log_config``), with no option to put them elsewhere; training requests write ``DIR/train_runs``. Serving
``bundle/monailabel/app`` itself would write all of this into the repository. :func:`make_app_folder` makes a
serving folder elsewhere: a copy of the app's ``main.py`` (run it again after editing the app) and an empty
``model/`` for the installed bundles. It refuses a folder inside the repository.

Usage::

    python -m bundle.monailabel.app_folder ~/lvm_med_label
    .venv-monailabel/bin/python -m monai.bundle download --name lvm_med --url file://$PWD/dist/lvm_med_v0.2.0.zip \
        --bundle_dir ~/lvm_med_label/model
    .venv-monailabel/bin/python -m monailabel.main start_server --app ~/lvm_med_label --studies <images> \
        --conf models lvm_med
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

__all__ = ["APP_SOURCE", "REPO_ROOT", "make_app_folder"]

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_SOURCE = Path(__file__).resolve().parent / "app"


def make_app_folder(folder: str | Path) -> Path:
    """Makes (or refreshes) the serving folder ``folder``: ``main.py`` copied from the app, and ``model/``.

    Returns:
        the folder, absolute.

    Raises:
        ValueError: ``folder`` is inside the repository (MONAI Label would write its logs there).
    """
    folder = Path(folder).expanduser().resolve()
    if folder.is_relative_to(REPO_ROOT):
        raise ValueError(f"app folder {folder} is inside the repository {REPO_ROOT}: MONAI Label writes logs/, bin/, "
                         "lib/ and model/ into the folder it serves; choose one outside it (e.g. ~/lvm_med_label)")
    (folder / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy2(APP_SOURCE / "main.py", folder / "main.py")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle.monailabel.app_folder",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the serving folder to make, outside the repository")
    args = parser.parse_args(argv)
    folder = make_app_folder(args.folder)
    print(f"MONAI Label app folder: {folder} (install bundles into {folder / 'model'}, serve with --app {folder})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
