"""Write a segmentation datalist for a folder of image/mask pairs.

``python -m scripts.make_datalist FOLDER --output datalist.json``

FOLDER holds ``imagesTr/`` + ``labelsTr/`` (or ``masksTr/``), optionally ``imagesVal/`` + ``labelsVal/`` and
``imagesTs/`` (+ ``labelsTs/``), or ``images/`` + ``masks/`` (or ``labels/``); a mask has its image's name, with any
image extension and optionally a ``_mask``, ``_seg``, ``_segmentation`` or ``_label`` suffix
(:mod:`scripts.data.layouts`). An MSD task folder (with its ``dataset.json``) is read too. The datalist is in the
Medical Segmentation Decathlon layout, with paths relative to the output file's folder (as MONAI's
``load_decathlon_datalist`` reads them), so it can be edited, versioned and given to the workflows as
``--datalist_file``. Only the output file is written; nothing goes into FOLDER unless ``--output`` points there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.atomic_save import write_atomically
from scripts.segmentation.datalist import SegmentationDataError, dataset_splits

__all__ = ["main", "make_datalist"]


def make_datalist(folder: str | os.PathLike, output: str | os.PathLike, validation_fraction: float = 0.0,
                  seed: int = 0) -> dict[str, int]:
    """Writes the datalist of ``folder`` to ``output`` and returns the item count of each split.

    Args:
        folder: a folder of image/mask pairs or an MSD task folder.
        output: the JSON file to write (its folder is created).
        validation_fraction: share of the training pairs written as ``validation`` when the folder has no
            validation split; 0 writes none (the training workflow then draws one by its own
            ``validation_fraction`` and ``seed``).
        seed: the seed of that draw.

    Raises:
        SegmentationDataError: the folder's layout is not readable (the message names the folder or file).
    """
    output = Path(output).resolve()
    splits = dataset_splits(folder, validation_fraction, seed)
    base = output.parent

    def relative(path: str) -> str:
        return Path(os.path.relpath(path, base)).as_posix()

    document = {split: [{key: relative(path) for key, path in item.items()} for item in items]
                for split, items in splits.items() if items}
    write_atomically(output, lambda temporary: temporary.write_text(json.dumps(document, indent=1), encoding="utf-8"))
    return {split: len(items) for split, items in document.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of image/mask pairs (or an MSD task folder)")
    parser.add_argument("--output", type=Path, required=True, help="datalist JSON to write")
    parser.add_argument("--validation_fraction", type=float, default=0.0,
                        help="share of training pairs written as validation when the folder has none (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default 0)")
    args = parser.parse_args(argv)
    try:
        counts = make_datalist(args.folder, args.output, args.validation_fraction, args.seed)
    except SegmentationDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: " + ", ".join(f"{count} {split}" for split, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
