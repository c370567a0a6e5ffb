"""``cp`` and ``export``: files in and out of a container, running or stopped, with docker's rules.

The container's side is always read and written by a worker whose root is the container's root
(:mod:`runner.copy_worker`), so the container's symlinks resolve inside it whatever they say:

- a *running* container: a helper joins the user and mount namespaces of the container's init
  (its root is then the container's, as for ``exec``), runs the worker and exits;
- a *stopped* (or created) container: its union (upper over the image's layers, with its volumes)
  is mounted in a sandbox without network whose init runs the worker instead of a command.

Writes go through the union mount in both cases, never into the upper directory behind the
filesystem's back (the kernel may cache what the union told it).

This side follows docker's client (``cli/command/container/cp.go`` and moby's ``pkg/archive``
``CopyInfoSourcePath``, ``CopyInfoDestinationPath``, ``PrepareArchiveCopy``): a trailing ``/.``
copies a directory's contents, a directory goes *into* an existing directory, a file onto an
existing file replaces it and into an existing directory keeps its name, a destination ending in
``/`` must exist, a missing parent is an error. The host side never chowns (files come out owned
by the caller, as docker's client extracts with NoLchown), and never creates set-id or device files.

Resource handling: :func:`open_worker` owns the helper or sandbox and reaps it when the block ends.
Error handling: :class:`runner.tar_copy.ArchiveError` (docker's client exit code 1) with docker's
wording where docker has one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from lamina.errors import ContainerError
from lamina.layout import Layout
from runner import copy_worker, linux, sealed
from runner.state import Container
from runner.tar_copy import (
    ArchiveError,
    ArchiveWriter,
    Extractor,
    Ownership,
    open_reader,
    open_writer,
    rebase_name,
)

log = logging.getLogger(__name__)

_JOINED = (("user", linux.CLONE_NEWUSER), ("mnt", linux.CLONE_NEWNS))


# --- the worker ---------------------------------------------------------------------------------------


class WorkerStream(io.BufferedRWPair):
    """Both directions of the socket to a worker; :meth:`end_writing` sends the end of file."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        super().__init__(sock.makefile("rb", buffering=0), sock.makefile("wb", buffering=0), 1 << 16)

    def end_writing(self) -> None:
        self.flush()
        self._sock.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def open_worker(layout: Layout, container: Container) -> Iterator[WorkerStream]:
    """A stream to a worker in ``container``'s root (see the module docstring)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if container.running and container.state.pid:
            reap = _start_in_running(container, theirs.fileno())
        else:
            reap = _start_on_stopped(layout, container, theirs.fileno())
    finally:
        theirs.close()
    stream = WorkerStream(ours)
    try:
        yield stream
    finally:
        with contextlib.suppress(OSError):
            stream.close()
        ours.close()
        reap()


def _start_in_running(container: Container, sock_fd: int) -> Any:
    sealed.sealed_interpreter()
    ns_fds = []
    try:
        for name, flag in _JOINED:
            path = f"/proc/{container.state.pid}/ns/{name}"
            if os.stat(path).st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
                ns_fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag))
    except OSError as e:
        for fd, _ in ns_fds:
            os.close(fd)
        raise ContainerError(f"cannot open the container's namespaces: {e.strerror}") from e
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            sealed.exec_sealed("copy-helper", (ns_fds, sock_fd), {2, sock_fd, *(fd for fd, _ in ns_fds)})
        finally:
            os._exit(125)
    for fd, _ in ns_fds:
        os.close(fd)
    return lambda: os.waitpid(pid, 0)


def sealed_copy_helper(ns_fds: list[tuple[int, int]], sock_fd: int) -> NoReturn:
    """In the sealed interpreter: enter the container (user namespace first), serve, exit."""
    code = 125
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        for fd, flag in ns_fds:
            linux.setns(fd, flag)
            os.close(fd)
        os.chdir("/")
        code = copy_worker.serve(sock_fd)
    finally:
        os._exit(code)


def _start_on_stopped(layout: Layout, container: Container, sock_fd: int) -> Any:
    from runner.lifecycle import build_spec
    from runner.sandbox import start_sandbox

    spec = build_spec(layout, container)
    spec.argv = ["lamina-copy"]
    spec.network, spec.ports, spec.init = "none", [], False
    spec.stdin = sock_fd
    spec.worker = copy_worker.serve
    sandbox = start_sandbox(spec)
    return sandbox.wait


def _answer(stream: io.BufferedIOBase) -> dict[str, Any]:
    try:
        answer = copy_worker.read_message(stream)
    except (ValueError, OSError):
        raise ContainerError("the copy helper in the container failed") from None
    if not answer:
        raise ContainerError("the copy helper in the container ended without an answer")
    if "error" in answer:
        raise ArchiveError(str(answer["error"]))
    return answer


def _request(stream: io.BufferedIOBase, **request: Any) -> dict[str, Any]:
    copy_worker.write_message(stream, request)
    return _answer(stream)


# --- docker's path rules -----------------------------------------------------------------------------


def _specifies_current_dir(path: str) -> bool:
    return path == "." or path.endswith("/.")


def _asserts_directory(path: str) -> bool:
    return path.endswith("/") or _specifies_current_dir(path)


def split_dir_entry(path: str) -> tuple[str, str]:
    """moby's SplitPathDirEntry: ("a/b/", "c") for "a/b/c", with "/." kept as base "."."""
    cleaned = os.path.normpath(path)
    if _specifies_current_dir(path):
        cleaned += "/."
    return os.path.dirname(cleaned) or ".", os.path.basename(cleaned)


def _container_path(path: str) -> str:
    absolute = "/" + path.lstrip("/")
    return absolute


def archive_base(container_path: str) -> str:
    """The name the archive of ``container_path`` starts with (docker: Base(absPath))."""
    absolute = _container_path(container_path)
    if _specifies_current_dir(absolute) or absolute.rstrip("/") == "":
        return "."
    return os.path.basename(absolute.rstrip("/"))


@dataclass
class Destination:
    path: str
    exists: bool = False
    is_dir: bool = False


def prepare_copy(src_is_dir: bool, src_base: str, dst: Destination) -> tuple[str, tuple[str, str] | None]:
    """moby's PrepareArchiveCopy: the directory to extract into and the rename of the archive's
    top entry (None: extract as it is)."""
    dst_dir, dst_base = split_dir_entry(dst.path)
    if dst.exists and dst.is_dir:
        return dst.path, None
    if dst.exists and src_is_dir:
        raise ArchiveError("cannot copy directory")
    if not dst.exists and not src_is_dir and _asserts_directory(dst.path):
        raise ArchiveError("no such directory")
    return dst_dir, (src_base, dst_base)


def host_destination(path: str) -> Destination:
    """moby's CopyInfoDestinationPath: symlinks at the destination are followed (at most 10)."""
    original = path
    for _ in range(11):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            parent, _base = split_dir_entry(path)
            if not os.path.isdir(parent):
                raise ArchiveError(f"destination directory {parent} does not exist") from None
            return Destination(path)
        if not os.path.islink(path):
            return Destination(path, True, os.path.isdir(path) and not os.path.islink(path))
        target = os.readlink(path)
        path = target if target.startswith("/") else os.path.join(split_dir_entry(path)[0], target)
        del st
    raise ArchiveError(f"too many symlinks in {original}")


def validate_output_path(path: str) -> None:
    """docker's ValidateOutputPath: the parent must exist, an existing path must be a directory or a
    regular file."""
    parent = os.path.dirname(os.path.normpath(path))
    if parent and parent != "." and not os.path.exists(parent):
        raise ArchiveError(f'invalid output path: directory "{parent}" does not exist')
    if os.path.exists(path) and not (os.path.isdir(path) or os.path.isfile(path)):
        raise ArchiveError(f'invalid output path: "{path}" must be a directory or a regular file')


def _absolute_local(path: str) -> str:
    """An absolute host path that keeps a trailing "/" or "/." (they change docker's rules)."""
    absolute = os.path.abspath(path)
    if _specifies_current_dir(path):
        return absolute + "/."
    if path.endswith("/") and absolute != "/":
        return absolute + "/"
    return absolute


# --- container -> host ---------------------------------------------------------------------------------


def _mount_targets(container: Container) -> list[str]:
    return [m["target"] for m in container.mounts if m.get("kind", "bind") in ("bind", "volume")]


def copy_from_container(layout: Layout, container: Container, src: str, dest: str, follow: bool,
                        out: IO[bytes] | None = None) -> None:
    """``cp CONTAINER:SRC DEST`` (``out``: the archive itself goes there, for ``DEST`` ``-``)."""
    if out is None:
        dest = _absolute_local(dest)
        validate_output_path(dest)
    source = _container_path(src)
    with open_worker(layout, container) as stream:
        info = _request(stream, op="get", path=source, follow=follow, arcname=archive_base(source),
                        mounts=_mount_targets(container))
        if not info.get("exists"):
            raise ArchiveError(f"Could not find the file {source} in container {container.name}")
        if out is not None:
            shutil.copyfileobj(stream, out, 1 << 20)
            out.flush()
            return
        base = archive_base(source)
        dst_dir, rebase = prepare_copy(bool(info["is_dir"]), base, host_destination(dest))
        _extract_on_host(stream, dst_dir, rebase)


def _extract_on_host(stream: io.BufferedIOBase, dst_dir: str, rebase: tuple[str, str] | None) -> None:
    try:
        dir_fd = os.open(dst_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ArchiveError(f"{dst_dir}: {e.strerror}") from None
    try:
        extractor = Extractor(dir_fd, Ownership(chown=False, host_side=True))
        with open_reader(stream) as tar:
            for member in tar:
                if rebase is not None:
                    member.name = rebase_name(member.name, *rebase)
                    if member.islnk():
                        member.linkname = rebase_name(member.linkname, *rebase)
                extractor.extract(tar, member)
        extractor.finish()
    except OSError as e:
        raise ArchiveError(f"{e.filename or dst_dir}: {e.strerror}") from None
    finally:
        os.close(dir_fd)


# --- host -> container ---------------------------------------------------------------------------------


@dataclass
class Source:
    """moby's CopyInfoSourcePath: the resolved host path, and the name the archive must use."""

    directory: str
    base: str
    is_dir: bool
    rebase: str = ""

    @property
    def archive_name(self) -> str:
        return self.rebase or self.base


def host_source(path: str, follow: bool) -> Source:
    path = _absolute_local(path)
    try:
        if follow:
            resolved = os.path.realpath(path, strict=True)
            if _specifies_current_dir(path) and not _specifies_current_dir(resolved):
                resolved += "/."
            rebase = split_dir_entry(path)[1] if split_dir_entry(path)[1] != split_dir_entry(resolved)[1] else ""
        else:
            head, tail = os.path.split(path)
            resolved = os.path.join(os.path.realpath(head, strict=True), tail) if tail else os.path.realpath(
                head, strict=True)
            if _specifies_current_dir(path):
                resolved = os.path.realpath(head, strict=True) + "/."
            rebase = ""
            if path.endswith("/") and os.path.basename(path.rstrip("/")) != os.path.basename(resolved):
                rebase = os.path.basename(path.rstrip("/"))
        directory, base = split_dir_entry(resolved)
        st_is_dir = os.path.isdir(resolved) and (base == "." or not os.path.islink(resolved))
        os.lstat(resolved)
    except OSError as e:
        raise ArchiveError(f"lstat {e.filename or path}: {(e.strerror or str(e)).lower()}") from None
    return Source(directory, base, st_is_dir, rebase)


def _container_destination(stream: io.BufferedIOBase, dest: str) -> Destination:
    """docker's client: stat the destination; a symlink is followed once (then stat again)."""
    info = _request(stream, op="stat", path=dest)
    if info.get("exists") and info.get("is_link"):
        target = str(info["link_target"])
        if not target.startswith("/"):
            target = os.path.join(split_dir_entry(dest)[0], target)
        dest = target
        info = _request(stream, op="stat", path=dest)
    return Destination(dest, bool(info.get("exists")), bool(info.get("is_dir")))


def copy_to_container(layout: Layout, container: Container, src: str, dest: str, follow: bool,
                      keep_owner: bool, archive_in: IO[bytes] | None = None) -> None:
    """``cp SRC CONTAINER:DEST`` (``archive_in``: a tar stream to extract, for ``SRC`` ``-``)."""
    dest = _container_path(dest)
    source = host_source(src, follow) if archive_in is None else None
    with open_worker(layout, container) as stream:
        dst = _container_destination(stream, dest)
        if source is None:
            if not dst.is_dir:
                raise ArchiveError(f'destination "{container.name}:{dest}" must be a directory')
            dst_dir, top = dst.path, None
        else:
            dst_dir, rebase = prepare_copy(source.is_dir, source.archive_name, dst)
            top = rebase[1] if rebase is not None else source.archive_name
        answer = _request(stream, op="put", directory=dst_dir, keep_owner=keep_owner)
        if not answer.get("ok"):
            if answer.get("errno") == errno.ENOTDIR:
                raise ArchiveError("extraction point is not a directory")
            raise ArchiveError(f"Could not find the file {dst_dir} in container {container.name}")
        try:
            if source is None:
                assert archive_in is not None
                shutil.copyfileobj(archive_in, stream, 1 << 20)
            else:
                assert top is not None
                _archive_host_source(source, top, stream)
            stream.end_writing()
        except BrokenPipeError:
            pass  # the worker stopped reading: its answer says why
        _answer(stream)


def _archive_host_source(source: Source, top: str, stream: io.BufferedIOBase) -> None:
    dir_fd = os.open(source.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open_writer(stream) as tar:
            ArchiveWriter(tar, lambda st: True).add(dir_fd, source.base, top)
    finally:
        os.close(dir_fd)


# --- export ----------------------------------------------------------------------------------------------


def export_container(layout: Layout, container: Container, out: IO[bytes]) -> None:
    """``export``: a tar of the container's own files (its volumes and mounts left out, as docker)."""
    with open_worker(layout, container) as stream:
        _request(stream, op="export")
        shutil.copyfileobj(stream, out, 1 << 20)
        out.flush()
