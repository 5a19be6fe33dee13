"""The image-folder index: each image's size, modification time, PIL verdict and caption, cached beside the
data in `.t2i-index.json`, so a large folder is verified once, not by every process of every run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

INDEX_NAME = ".t2i-index.json"  # hidden: the folder walk skips it
VERSION = 1


class FolderIndex:
    """{path relative to root: {"size", "mtime_ns", "verified", "caption"}}. An entry holds while its file's
    size and mtime are unchanged; a changed, new or removed file invalidates only its own entry."""

    def __init__(self, root: Path):
        self.root, self.path = root, root / INDEX_NAME
        self.entries: dict[str, dict] = {}
        self.reused = self.checked = 0
        self._dirty = False
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("version") == VERSION:
                self.entries = {k: v for k, v in saved["files"].items() if isinstance(v, dict)}
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no index yet, or a damaged one: rebuild it

    def verified(self, path: Path, check: Callable[[Path], bool]) -> bool:
        """The cached verdict on `path` when its size and mtime match, else check(path), remembered."""
        key, stat = path.relative_to(self.root).as_posix(), path.stat()
        entry = self.entries.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns \
                and isinstance(entry.get("verified"), bool):
            self.reused += 1
            return entry["verified"]
        self.checked += 1
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "verified": check(path)}
        self._dirty = True
        return self.entries[key]["verified"]

    def save(self, images: list[Path], captions: dict[Path, str]) -> None:
        """Keep the entries of `images` only, with their captions, and write the index atomically (a
        read-only data folder just goes without one)."""
        keep = {p.relative_to(self.root).as_posix(): p for p in images}
        entries = {k: {**self.entries[k], "caption": captions.get(p)} for k, p in keep.items() if k in self.entries}
        if not self._dirty and entries == self.entries:
            return
        self.entries, tmp = entries, self.path.with_name(f"{INDEX_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": VERSION, "files": entries}))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
