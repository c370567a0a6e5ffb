"""Running the ``lamina`` command for benchmarks: as root or as an unprivileged user, private root.

Each :class:`LaminaCli` has its own ``--root`` directory, so a benchmark never sees, or changes,
anyone's images. :meth:`LaminaCli.missing` tells whether a verb exists yet (the packages land one
by one): a benchmark whose verb is missing reports "not available", never a number.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import NOT_AVAILABLE, CommandFailed
from bench.podman_env import PodmanUser


def lamina_command() -> list[str]:
    """The lamina entry point of the interpreter running us (the project's venv)."""
    script = Path(sys.executable).parent / "lamina"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lamina"]


class LaminaCli:
    """``lamina --root ROOT ...`` run as ``user`` (None: as ourselves)."""

    def __init__(self, root: Path, user: PodmanUser | None = None) -> None:
        self.root = root
        self.user = user
        self.home = root.parent / f"{root.name}-home"
        self.runtime_dir = root.parent / f"{root.name}-xdg"
        for directory in (root, self.home, self.runtime_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.chmod(0o700)
        if user is not None:
            for directory in (root, self.home, self.runtime_dir):
                os.chown(directory, user.uid, user.gid)

    @property
    def label(self) -> str:
        return "lamina" if self.user is None else "lamina rootless"

    def argv(self, args: Sequence[str]) -> list[str]:
        return [*lamina_command(), "--root", str(self.root), *args]

    def subprocess_kwargs(self) -> dict:
        """What subprocess.run needs to run a command as this CLI's user, with its environment."""
        env = dict(os.environ)
        if self.user is not None:
            env.update(HOME=str(self.home), USER=self.user.name, LOGNAME=self.user.name,
                       XDG_RUNTIME_DIR=str(self.runtime_dir))
            return {"env": env, "user": self.user.uid, "group": self.user.gid, "extra_groups": []}
        return {"env": env}

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 900,
            cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess[bytes]]:
        """Run ``lamina ARGS``; seconds from spawn to exit, and the completed process."""
        argv = self.argv(args)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=timeout, cwd=cwd, **self.subprocess_kwargs())
        elapsed = time.perf_counter() - start
        if check and done.returncode != 0:
            raise CommandFailed(argv, done)
        return elapsed, done

    def missing(self, verb: str) -> str | None:
        """None when ``lamina VERB`` exists and this user can run it, else a "not available" note."""
        _, done = self.run([verb, "--help"], check=False, timeout=120)
        if done.returncode == 0:
            return None
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        if "invalid choice" in last:
            return f"{NOT_AVAILABLE}: lamina has no `{verb}` verb yet"
        who = f" as {self.user.name}" if self.user else ""
        return f"{NOT_AVAILABLE}: `lamina {verb} --help`{who} exits {done.returncode} ({last[:140]})"

    def reset(self) -> None:
        """Forget every image, layer and cache: an empty store for a cold measurement."""
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
