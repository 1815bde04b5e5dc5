"""Image headers remembered between runs, so that re-indexing a large collection does not re-read every file.

Building the pretraining index (:class:`~scripts.data.slices.PretrainSliceDataset`) reads the header of every
image; for 100,000 files that is most of its time. :class:`HeaderCache` keeps each single-file image's header
(shape and channels) in a JSON file beside the manifest, keyed by the file's resolved path, size and
modification time (nanoseconds): a file rewritten since is read again. DICOM series (several files, one
header) and images whose headers could not be read are not cached: they are read every time, so their
problems are always reported.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from scripts.atomic_save import write_atomically
from scripts.data.readers import ImageHeader, ImageSource

__all__ = ["HeaderCache", "header_cache_path"]

logger = logging.getLogger("lvmmed.data")

_VERSION = 1


def header_cache_path(manifest: str | Path) -> Path:
    """Where the header cache of ``manifest`` lives: ``<manifest>.headers.json`` beside it."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + ".headers.json")


class HeaderCache:
    """Headers of single-file images keyed by (resolved path, size, mtime), loaded from and saved to ``path``.

    A missing, unreadable or foreign file starts an empty cache (logged); :meth:`save` writes only the entries
    looked up or stored since loading (files that left the collection are forgotten), atomically, and only
    when something changed; a folder that cannot be written is logged and left alone.

    Args:
        path: the JSON file of the cache.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stored: dict[str, list] = {}
        self._used: dict[str, list] = {}
        self._changed = False
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            logger.warning("header cache %s unreadable (%s): reading every header", self.path, error)
            return
        if not isinstance(document, dict) or document.get("version") != _VERSION \
                or not isinstance(document.get("headers"), dict):
            logger.warning("header cache %s has an unknown layout: reading every header", self.path)
            return
        self._stored = document["headers"]

    @staticmethod
    def _key(source: ImageSource) -> tuple[str, list] | None:
        """(path, [size, mtime_ns]) of a single-file source; None for series and files that cannot be stat'ed."""
        if source.files:
            return None
        try:
            status = os.stat(source.path)
        except OSError:
            return None
        return str(Path(os.path.abspath(source.path))), [status.st_size, status.st_mtime_ns]

    def lookup(self, source: ImageSource) -> ImageHeader | None:
        """The cached header of ``source`` if its file is unchanged since it was stored, else None."""
        key = self._key(source)
        record = self._stored.get(key[0]) if key is not None else None
        if key is None or not isinstance(record, list) or len(record) != 5 or record[:2] != key[1] \
                or record[2] != source.format:
            return None
        self._used[key[0]] = record
        return ImageHeader(source.path, source.format, tuple(record[3]), int(record[4]))

    def store(self, source: ImageSource, header: ImageHeader) -> None:
        """Remember ``header`` for ``source`` (series are not cached)."""
        key = self._key(source)
        if key is None:
            return
        self._used[key[0]] = [*key[1], source.format, list(header.shape), header.channels]
        self._changed = True

    def save(self) -> None:
        """Write the entries used since loading, if anything changed."""
        if not self._changed and len(self._used) == len(self._stored):
            return
        text = json.dumps({"version": _VERSION, "headers": self._used}, separators=(",", ":"))
        try:
            write_atomically(self.path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
        except OSError as error:
            logger.warning("could not write the header cache %s (%s); the next run reads every header again",
                           self.path, error)
            return
        self._stored, self._changed = dict(self._used), False
