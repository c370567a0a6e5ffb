"""Test harness: union mounts served from a separate process, and an unprivileged user to run as.

Why a separate process: pyfuse3 allows one session per process, and a blocking system call made by
the test on the mount from the same trio loop that serves it would deadlock. So every mount test
starts ``python -m unionfs -f ...`` as a child, polls until the mount is up (with a deadline), and
always unmounts in ``finally``: ``fusermount3 -u``, then ``fusermount3 -u -z``, then kill.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lamina", "unionfs", "builder", "runner")
MOUNT_DEADLINE_S = 15.0


class MountFailed(RuntimeError):
    """The filesystem process exited or did not become ready before the deadline."""


def fuse_mounts_under(prefix: Path) -> list[Path]:
    """Mount points of FUSE filesystems at or below ``prefix`` in this mount namespace."""
    found = []
    prefix_str = str(prefix)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            mountpoint = fields[4].replace("\\040", " ")
            if fstype.startswith("fuse") and (mountpoint == prefix_str or mountpoint.startswith(prefix_str + "/")):
                found.append(Path(mountpoint))
    return found


class SessionMounts:
    """The places where this test session mounts: the end-of-session sweep unmounts what is left
    there and nothing else. Other test sessions and other programs mount under /tmp too (with the
    same names): a sweep by name would take their mounts from under them."""

    def __init__(self) -> None:
        self._roots: set[Path] = set()

    def record(self, root: Path) -> None:
        """``root`` and everything below it is this session's to unmount."""
        self._roots.add(Path(os.path.abspath(root)))

    def roots(self) -> list[Path]:
        return sorted(self._roots)

    def sweep(self) -> list[Path]:
        """Unmount every FUSE mount at or below a recorded root, deepest first; return them."""
        left = {m for root in self._roots for m in fuse_mounts_under(root)}
        ordered = sorted(left, key=lambda p: len(p.parts), reverse=True)
        for mountpoint in ordered:
            force_unmount(mountpoint)
        return ordered


SESSION_MOUNTS = SessionMounts()


def is_mounted(mountpoint: Path) -> bool:
    return mountpoint in fuse_mounts_under(mountpoint)


def force_unmount(mountpoint: Path) -> None:
    """Unmount however it takes: polite, then lazy. Never raises."""
    for args in (["fusermount3", "-u", str(mountpoint)], ["fusermount3", "-u", "-z", str(mountpoint)]):
        if not is_mounted(mountpoint):
            return
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if is_mounted(mountpoint) and os.geteuid() == 0:
        subprocess.run(["umount", "-l", str(mountpoint)], stderr=subprocess.DEVNULL, check=False)


@dataclass
class MountedUnion:
    mountpoint: Path
    process: subprocess.Popen[bytes]
    argv: list[str]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def unmount(self, timeout: float = 10.0) -> int | None:
        """Unmount and wait for the server to exit; returns its exit code (None if it had to be killed)."""
        force_unmount(self.mountpoint)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            return None


def union_argv(lowers: Sequence[Path], upper: Path | None, work: Path | None, mountpoint: Path,
               options: Sequence[str] = (), extra_args: Sequence[str] = ()) -> list[str]:
    def escape(p: Path) -> str:
        return str(p).replace(":", "\\:")

    opts = ["lowerdir=" + ":".join(escape(p) for p in lowers)]
    if upper is not None:
        opts.append(f"upperdir={escape(upper)}")
    if work is not None:
        opts.append(f"workdir={escape(work)}")
    opts.extend(options)
    return [sys.executable, "-m", "unionfs", "-f", *extra_args, "-o", ",".join(opts), str(mountpoint)]


def start_union(argv: list[str], mountpoint: Path, stderr_path: Path,
                deadline_s: float = MOUNT_DEADLINE_S) -> MountedUnion:
    """Start the server and wait until ``mountpoint`` is a FUSE mount that answers stat().

    Error handling: raises :class:`MountFailed` with the server's stderr if it exits first or the
    deadline passes; in that case nothing is left mounted or running.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    SESSION_MOUNTS.record(mountpoint)
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                   cwd=REPO_ROOT, start_new_session=True)
    mounted = MountedUnion(mountpoint, process, argv, stderr_path)
    deadline = time.monotonic() + deadline_s
    while True:
        if process.poll() is not None:
            force_unmount(mountpoint)
            raise MountFailed(f"unionfs exited with {process.returncode} before mounting: {mounted.stderr()}")
        if is_mounted(mountpoint):
            with contextlib.suppress(OSError):
                os.stat(mountpoint)
                return mounted
        if time.monotonic() > deadline:
            mounted.unmount(timeout=2)
            raise MountFailed(f"unionfs not ready after {deadline_s} s: {mounted.stderr()}")
        time.sleep(0.02)


# --- an unprivileged user ------------------------------------------------------------------------

TEST_USERS = {True: "lamina-t-sub", False: "lamina-t-nosub"}


def _ensure_user(name: str, with_subids: bool) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        created = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Exit 9: another test run created the same user between our lookup and useradd.
        if created.returncode not in (0, 9):
            raise AssertionError(f"useradd {name} failed: {created.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = Path(path).read_text().splitlines() if os.path.exists(path) else []
        others = [line for line in lines if not line.startswith(name + ":")]
        mine = [line for line in lines if line.startswith(name + ":")]
        if with_subids and not mine:
            # Pick a range above every existing one, as useradd would.
            top = max((int(line.split(":")[1]) + int(line.split(":")[2]) for line in others if line.count(":") == 2),
                      default=100000)
            others.append(f"{name}:{max(top, 100000)}:65536")
            Path(path).write_text("\n".join(others) + "\n")
        elif not with_subids and mine:
            Path(path).write_text("\n".join(others) + ("\n" if others else ""))
    return entry


def _copy_runtime(dest: Path) -> tuple[Path, Path]:
    """A world-readable copy of lamina's source and its installed dependencies.

    CI clones the project into a folder other users may not be able to enter, and the venv's
    editable install points there; so the unprivileged user runs a copy.
    """
    src = dest / "src"
    site = dest / "site"
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    skip = ("pip", "setuptools", "mypy", "mypyc", "ruff", "_distutils_hack", "__editable__", "lamina")
    purelib = Path(sysconfig.get_paths()["purelib"])
    site.mkdir(parents=True)
    for entry in purelib.iterdir():
        if entry.name.startswith(skip) or entry.suffix == ".pth":
            continue
        if entry.is_dir():
            shutil.copytree(entry, site / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, site / entry.name)
    return src, site


@dataclass
class UnprivilegedRuntime:
    """What every unprivileged test shares: the copied runtime and the wrapper scripts."""

    base: Path
    bin: Path
    pythonpath: str

    @classmethod
    def create(cls) -> UnprivilegedRuntime:
        base = Path(tempfile.mkdtemp(prefix="lamina-unpriv-", dir="/tmp"))
        SESSION_MOUNTS.record(base)  # the user's stores and runtime directories: mounts land here
        base.chmod(0o755)
        src, site = _copy_runtime(base)
        pythonpath = f"{src}:{site}"
        bindir = base / "bin"
        bindir.mkdir()
        for name, module in (("lamina", "lamina"), ("lamina-unionfs", "unionfs"), ("lamina-python", None)):
            script = bindir / name
            target = f"-m {module} " if module else ""
            script.write_text(f'#!/bin/sh\nPYTHONPATH={pythonpath} exec /usr/bin/python3 {target}"$@"\n')
            script.chmod(0o755)
        for path in base.rglob("*"):
            mode = path.lstat().st_mode
            if not path.is_symlink():
                path.chmod(mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0))
        return cls(base, bindir, pythonpath)


@dataclass
class UnprivilegedUser:
    """An unprivileged account to run lamina as (created by the fixture; root needed to set up)."""

    user: str
    uid: int
    gid: int
    home: Path
    has_subids: bool
    runtime: UnprivilegedRuntime
    workdir: Path
    runtime_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "HOME": str(self.home), "USER": self.user, "LOGNAME": self.user,
            "PATH": f"{self.runtime.bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir), "LANG": "C.UTF-8",
            "LAMINA_ROOT": str(self.workdir / "root"), "PYTHONPATH": self.runtime.pythonpath,
        }
        env.update(self.env_extra)
        env.update(extra or {})
        return env

    def run(self, argv: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(list(argv), cwd=cwd or self.workdir, env=self.env(env), input=input,
                                user=self.uid, group=self.gid, extra_groups=[], capture_output=True,
                                text=True, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{list(argv)} as {self.user} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def lamina(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["lamina", *args], **kwargs)  # type: ignore[arg-type]

    def chown_tree(self, path: Path) -> None:
        """Give a tree the test created as root to this user."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)


def make_unprivileged_user(runtime: UnprivilegedRuntime, with_subids: bool, workdir: Path) -> UnprivilegedUser:
    for dev in ("/dev/fuse", "/dev/net/tun"):
        # A normal distribution gives these to everybody; these machines have 0600.
        if os.path.exists(dev):
            os.chmod(dev, 0o666)
    entry = _ensure_user(TEST_USERS[with_subids], with_subids)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    workdir.chmod(0o755)
    runtime_dir = runtime.base / f"run-{entry.pw_uid}"
    runtime_dir.mkdir(exist_ok=True)
    os.chown(runtime_dir, entry.pw_uid, entry.pw_gid)
    runtime_dir.chmod(0o700)
    # Every ancestor of the workdir must be traversable by the user.
    for parent in workdir.parents:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise AssertionError(f"{parent} is not traversable by other users; cannot run unprivileged tests")
    return UnprivilegedUser(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), with_subids,
                            runtime, workdir, runtime_dir)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- a busybox root ------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")


def make_busybox_rootfs(root: Path) -> Path:
    """A minimal root: busybox-static plus applet symlinks, /etc/passwd, /etc/group, /tmp.

    Applet links point at ``/bin/busybox`` inside the root (``busybox --install`` run from outside a
    chroot would point them at the host's path).
    """
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root", "home", "var", "proc", "dev", "sys"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    listing = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout
    for applet in listing.split():
        link = root / applet
        if link.name == "busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return root


def kill_process_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def mounts_left(prefixes: Iterator[Path] | Sequence[Path]) -> list[Path]:
    left: list[Path] = []
    for prefix in prefixes:
        left.extend(fuse_mounts_under(prefix))
    return left


# docker's client (github docker/cli): `run` and `create` report their errors with 125 (as does any
# bad flag), every other command with 1. lamina's own verbs, which docker lacks, keep 125.
EXITING_125 = ("run", "create", "layers", "mount", "umount", "which")


def docker_error_code(argv: Sequence[str]) -> int:
    """The exit code docker gives when the command ``argv`` fails: the full argv of a finished
    process (``python -m lamina --root R VERB ...``, ``lamina VERB ...``) or only the verb's part."""
    words = list(argv)
    if "lamina" in words:
        words = words[words.index("lamina") + 1:]
    words = [w for i, w in enumerate(words)
             if not w.startswith("-") and not (i and words[i - 1] in ("--root", "--log-level"))]
    verb = words[1] if len(words) > 1 and words[0] in ("container", "image", "builder", "system") else \
        (words[0] if words else "")
    return 125 if verb in EXITING_125 else 1


def run_with_a_terminal(argv: Sequence[str], stream: str = "stdout") -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Run ``argv`` with its ``stream`` ("stdout" or "stderr") on a pseudo-terminal and the other
    one captured; returns the result and what the terminal showed (``\\r\\n`` as ``\\n``)."""
    master, slave = os.openpty()
    other = {"stdout": "stderr", "stderr": "stdout"}[stream]
    try:
        result = subprocess.run(list(argv), stdin=subprocess.DEVNULL, timeout=120,
                                **{stream: slave, other: subprocess.PIPE})  # type: ignore[call-overload]
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the terminal has no writer left
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return result, b"".join(chunks).decode().replace("\r\n", "\n")
