"""Folder outputs (diffusers layouts): built in a temporary folder beside the target, renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputError
from .writer import check_output

DIFFUSERS_MARKER = "model_index.json"


def weight_file(component: str) -> str:
    """The weights file diffusers / transformers look for in a component folder."""
    return "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"


class FolderOutput:
    """An output folder built in a temporary folder beside it and renamed into place when complete.

    Use as a context manager; :attr:`tmp` is where the files go. Any exception (SIGINT/SIGTERM
    included, see :mod:`loratool.cli`) removes the temporary folder and leaves ``path`` untouched.

    Replacing an existing folder (``force``) only ever replaces the files of the layout we write: the
    folder must be empty or a diffusers folder (it has ``model_index.json``); after the swap, every file
    of the old folder that the new one does not have (notes, other weights) is moved into the new
    folder, and only the old files we replaced are deleted. A non-empty folder that is not a diffusers
    folder is refused, with or without ``force``.

    Raises:
        OutputError: see :func:`check_output`; an existing file, or a foreign non-empty folder.
    """

    def __init__(self, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False):
        self.path = check_output(Path(path), inputs, force)
        if self.path.exists():
            if not self.path.is_dir():
                raise OutputError(f"{self.path} is a file; a diffusers layout is written as a folder",
                                  hint="remove it yourself or choose another name")
            if any(self.path.iterdir()) and not (self.path / DIFFUSERS_MARKER).is_file():
                raise OutputError(
                    f"{self.path} is a non-empty folder that is not a diffusers folder (no {DIFFUSERS_MARKER})",
                    hint="loratool never deletes files it did not write; choose a new folder name",
                )
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._done = False

    def commit(self) -> Path:
        if not self.path.exists():
            os.replace(self.tmp, self.path)
        else:
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            for f in sorted(old.rglob("*")):
                rel = f.relative_to(old)
                if (f.is_file() or f.is_symlink()) and not (self.path / rel).exists():
                    (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, self.path / rel)
            shutil.rmtree(old)  # only what the new folder replaced is left in it
        self._done = True
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> FolderOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()
