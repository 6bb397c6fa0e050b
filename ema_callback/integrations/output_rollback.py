"""Leave a suite's output folder as it was when the EMA set-up fails.

PaddleOCR's ``preprocess`` writes ``config.yml`` and opens ``train.log`` in the output folder before the
model exists, i.e. before an EMA resume file can be checked against it. ``OutputGuard`` notes what those
files were; if an error escapes before ``release()`` (the EMA is set up), it puts them back: ``train.log``
truncated to its old length (or removed), ``config.yml`` rewritten with its old bytes (or removed), and
the folder removed when this run created it and left it empty.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

WATCHED = ("config.yml", "train.log")


class OutputGuard:
    def __init__(self, folder: Optional[str]):
        self.folder = os.path.abspath(folder) if folder else None
        self.active = False
        self._existed = False
        self._files: Dict[str, Tuple[bool, bytes, int]] = {}

    def __enter__(self) -> "OutputGuard":
        if self.folder is None:
            return self
        self.active = True
        self._existed = os.path.isdir(self.folder)
        for name in WATCHED:
            path = os.path.join(self.folder, name)
            if os.path.isfile(path):
                size = os.path.getsize(path)
                content = open(path, "rb").read() if name == "config.yml" else b""
                self._files[name] = (True, content, size)
            else:
                self._files[name] = (False, b"", 0)
        return self

    def release(self) -> None:
        """The EMA is set up; the files written from now on belong to the run."""
        self.active = False

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.active and exc_type is not None and self.folder is not None:
            self._roll_back()
        self.active = False
        return False

    def _roll_back(self) -> None:
        for name, (existed, content, size) in self._files.items():
            path = os.path.join(self.folder, name)
            if not existed:
                if os.path.isfile(path):
                    os.remove(path)
            elif name == "config.yml":
                with open(path, "wb") as handle:
                    handle.write(content)
            elif os.path.isfile(path):
                with open(path, "r+b") as handle:
                    handle.truncate(size)
        if not self._existed and os.path.isdir(self.folder) and not os.listdir(self.folder):
            os.rmdir(self.folder)
