"""Where lamina keeps its state: the ``--root`` directory and its defaults."""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "LAMINA_ROOT"


def default_root() -> Path:
    """``/var/lib/lamina`` for root, ``$XDG_DATA_HOME/lamina`` (``~/.local/share/lamina``) otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/lamina")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "lamina"


def resolve_root(cli_value: str | None) -> Path:
    """The ``--root`` flag wins, then ``LAMINA_ROOT``, then the default."""
    if cli_value:
        return Path(cli_value).absolute()
    env_value = os.environ.get(ROOT_ENV)
    if env_value:
        return Path(env_value).absolute()
    return default_root()
