"""The part of ``cp`` and ``export`` that runs inside a container's root.

The worker is a process whose root directory *is* the container's root (it joined a running
container's mount namespace, or it is the init of a sandbox started on a stopped container's
union, after ``pivot_root``), as root of the container's user namespace. So every path it resolves,
``..`` and absolute symlinks included, is resolved by the kernel inside the container: nothing the
container put in its tree can lead the worker to a host file. It talks to lamina over one socket:
one JSON request line, one JSON answer line, then a tar stream (see :mod:`runner.container_files`
for the requests and docker's rules on the lamina side).

Nothing is imported after the worker enters the container (there is no host library to import
from): this module's imports are all it uses.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import tarfile
from typing import Any

from runner import tar_copy

MAX_REQUEST = 1 << 16


def read_message(stream: io.BufferedIOBase) -> dict[str, Any]:
    """One JSON object on one line, at most MAX_REQUEST bytes; ValueError otherwise ({} at the end
    of the stream)."""
    line = stream.readline(MAX_REQUEST + 1)
    if not line:
        return {}
    if not line.endswith(b"\n") or len(line) > MAX_REQUEST:
        raise ValueError("truncated or oversized message")
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def write_message(stream: io.BufferedIOBase, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def _split(path: str) -> tuple[str, str]:
    """docker's ResolvePath split: the directory to resolve (following symlinks) and the last
    component, which is not followed ("" when the path ends with a slash: the directory itself)."""
    absolute = "/" + path.lstrip("/")
    if absolute.endswith("/."):
        return absolute[:-1], "."
    if absolute.endswith("/"):
        return absolute, "."
    directory, base = absolute.rsplit("/", 1)
    return directory or "/", base


def describe(path: str, follow: bool = False) -> dict[str, Any]:
    """docker's ContainerStatPath of container path ``path`` (``follow``: the symlink's target)."""
    directory, base = _split(path)
    if follow:
        directory, base = _split(os.path.realpath(os.path.join(directory, base)))
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return {"exists": False, "errno": e.errno, "path": path}
    try:
        st = tar_copy.lstat_in(dir_fd, base)
    except OSError as e:
        return {"exists": False, "errno": e.errno, "path": path}
    finally:
        os.close(dir_fd)
    answer: dict[str, Any] = {"exists": True, "is_dir": stat.S_ISDIR(st.st_mode),
                              "is_link": stat.S_ISLNK(st.st_mode), "directory": directory, "base": base,
                              "regular": stat.S_ISREG(st.st_mode)}
    if answer["is_link"]:
        answer["link_target"] = os.readlink(os.path.join(directory, base))
    return answer


def _crossable_devices(root_dev: int, mount_targets: list[str]) -> set[int]:
    devices = {root_dev}
    for target in mount_targets:
        try:
            devices.add(os.stat(target).st_dev)
        except OSError:
            continue
    return devices


def _get(request: dict[str, Any], stream: io.BufferedIOBase) -> None:
    info = describe(str(request["path"]), bool(request.get("follow")))
    write_message(stream, info)
    if not info["exists"]:
        return
    devices = _crossable_devices(os.stat("/").st_dev, list(request.get("mounts") or []))
    dir_fd = os.open(info["directory"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with tar_copy.open_writer(stream) as tar:
            writer = tar_copy.ArchiveWriter(tar, lambda st: st.st_dev in devices)
            writer.add(dir_fd, info["base"], str(request.get("arcname") or info["base"]))
    finally:
        os.close(dir_fd)
    stream.flush()


def _export(stream: io.BufferedIOBase) -> None:
    """The container's own files: what lies on the root's device (nothing mounted on it)."""
    root_dev = os.stat("/").st_dev
    dir_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with tar_copy.open_writer(stream) as tar:
            writer = tar_copy.ArchiveWriter(tar, lambda st: st.st_dev == root_dev)
            for name in tar_copy.list_names(dir_fd):
                st = tar_copy.lstat_in(dir_fd, name)
                if st.st_dev != root_dev and not stat.S_ISDIR(st.st_mode):
                    continue  # a file bound over one of the container's (/etc/hosts...)
                if stat.S_ISDIR(st.st_mode) and st.st_dev != root_dev:
                    tar.addfile(tar_copy.header(name, st, tarfile.DIRTYPE))
                    continue
                writer.add(dir_fd, name, name)
    finally:
        os.close(dir_fd)
    stream.flush()


def _put(request: dict[str, Any], stream: io.BufferedIOBase) -> None:
    directory = str(request["directory"])
    try:
        dir_fd = os.open("/" + directory.lstrip("/"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        write_message(stream, {"ok": False, "errno": e.errno})
        return
    try:
        write_message(stream, {"ok": True})
        ownership = tar_copy.Ownership(chown=True, keep=bool(request.get("keep_owner")))
        with tar_copy.open_reader(stream) as tar:
            tar_copy.Extractor(dir_fd, ownership).extract_all(tar)
    finally:
        os.close(dir_fd)


def serve(sock_fd: int) -> int:
    """Answer one request on the socket ``sock_fd``; the exit status says whether it worked
    (an error's text is sent as ``{"error": ...}`` when the answer line has not been sent yet)."""
    sock = socket.socket(fileno=sock_fd)
    stream = sock.makefile("rwb")
    try:
        while True:  # "stat" requests, then one that ends the session
            request = read_message(stream)
            if not request:
                return 0
            op = request.get("op")
            if op != "stat":
                break
            write_message(stream, describe(str(request["path"]), bool(request.get("follow"))))
        if op == "get":
            _get(request, stream)
        elif op == "put":
            _put(request, stream)
            write_message(stream, {"done": True})
        elif op == "export":
            write_message(stream, {"exists": True})
            _export(stream)
        else:
            write_message(stream, {"error": f"unknown request {op!r}"})
            return 1
    except (OSError, ValueError, KeyError, tarfile.TarError, tar_copy.ArchiveError) as e:
        message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.filename:
            message += f": {e.filename}"
        try:
            write_message(stream, {"error": message})
        except OSError:
            pass
        return 1
    finally:
        try:
            stream.close()
            sock.close()
        except OSError:
            pass
    return 0
