"""Checkpoint names as harnesses pass them: a local folder, or a hub repo id. A name that can only be a local
path and does not exist is reported as such, before any hub lookup turns it into a 'Repo id must be in the form'
or network error."""

from __future__ import annotations

from pathlib import Path


def check_checkpoint(name: str, option: str) -> str:
    """`name` unchanged when it is an existing folder or could be a hub id ("org/model"); else a ValueError
    that names `option` and says what is wrong."""
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return str(name)
    if path.exists():
        raise ValueError(f"{option}={name!r} is a file; give the checkpoint folder (with config.json) or a hub id")
    text = str(name)
    hub_like = text.count("/") == 1 and not text.startswith((".", "~")) and "\\" not in text and ".." not in text
    if not hub_like:
        raise ValueError(f"{option}={name!r} does not exist (no such folder, and it is not a hub id of the form org/model)")
    return text
