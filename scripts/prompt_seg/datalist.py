"""Training/validation lists of (image, mask) pairs for box-prompted segmentation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

from scripts.data.readers import read_image

__all__ = ["load_prompt_seg_datalist"]

logger = logging.getLogger(__name__)


def load_prompt_seg_datalist(
    datalist_file: str | Path, key: str = "training", base_dir: str | Path | None = None, skip_empty: bool = False
) -> list[dict]:
    """``[{"image": path, "label": path}, ...]`` from a MONAI decathlon-style JSON (``{"training": [...], ...}``).

    Paths are relative to ``base_dir`` (default: the datalist's folder).

    Args:
        datalist_file: the JSON file.
        key: the list to read (``"training"``, ``"validation"``).
        base_dir: folder the relative paths start from.
        skip_empty: drop pairs whose mask has no foreground (no box can be derived from them) and log how many and
            which; when False, an empty mask stops training with an error naming it.

    Raises:
        ValueError: the file is missing or not valid JSON, the list is missing or empty, or an entry lacks a file.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise ValueError(f"datalist {path} does not exist")
    try:
        items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key,
                                        base_dir=str(base_dir) if base_dir is not None else None)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"datalist {path} is not valid JSON: {error}") from error
    except ValueError as error:  # MONAI: "Data list {key} not specified in ..."
        raise ValueError(f"datalist {path}: {error}") from error
    if not items:
        raise ValueError(f"datalist {path} has an empty {key!r} list")
    for item in items:
        for field in ("image", "label"):
            if field not in item or not Path(item[field]).is_file():
                raise ValueError(f"datalist {path}: {key} entry {item} has no existing {field!r} file")
    if not skip_empty:
        return items
    kept = [item for item in items if np.any(read_image(item["label"])[0])]
    skipped = [Path(item["label"]).name for item in items if item not in kept]
    if skipped:
        logger.warning("%s %s: skipped %d of %d pairs with an empty mask: %s", path, key, len(skipped), len(items),
                       ", ".join(skipped[:20]))
    if not kept:
        raise ValueError(f"datalist {path}: every {key} mask is empty")
    return kept
