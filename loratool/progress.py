"""The one progress protocol between the library and the terminal.

Every long operation takes ``on_progress: Progress | None`` and calls it as ``on_progress(done, total,
label)`` after each unit of work (a tensor, a module, a training step): ``done`` counts units so far,
``total`` is known from the first call, ``label`` names the unit just finished (a key, a module, the
current loss). The library never prints; :func:`loratool.render.common.progress_bar` draws it.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]
