"""Progress bars that appear only on an interactive terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kwargs):
    """Return a tqdm bar, disabled unless ``enabled`` and stderr is a TTY."""
    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False, **kwargs)
