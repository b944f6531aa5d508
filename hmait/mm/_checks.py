"""Checks shared by the checked datasets (no mmdet/mmseg imports here)."""
from __future__ import annotations

import os
from collections.abc import Iterable


def is_remote(path: str) -> bool:
    """True for URIs such as ``s3://`` that mmengine's file backends read; they are not checked locally."""
    return '://' in str(path)


def check_files_exist(paths: Iterable[str], what: str, source: str) -> None:
    """Raise FileNotFoundError listing the ``paths`` missing from disk (up to five of them).

    ``what`` names the kind of file ('image', 'label map') and ``source`` where the paths came from.
    """
    missing = [p for p in paths if not is_remote(p) and not os.path.isfile(p)]
    if missing:
        shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
        raise FileNotFoundError(f'{len(missing)} {what} file(s) listed by {source} are missing from disk: '
                                f'{shown}')
