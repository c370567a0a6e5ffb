"""Open the layer directories from a throwaway mount namespace, so they pin no mount of the caller's.

umount(8) of a FUSE mount returns as soon as the kernel has cut the connection; the server learns
of it afterwards. Until it has closed its layer descriptors, a descriptor pins the mount it was
opened on, so ``umount M && umount LOWERFS`` can fail with EBUSY for as long as the server takes to
wake up, however quickly it lets go then.

A descriptor opened in another mount namespace pins that namespace's copy of the mount instead. So a
forked child unshares the mount namespace, makes every mount of its copy private (no unmount
propagates between the copy and the caller's mounts, and none is refused because the copy is busy),
opens the directories, hands the descriptors back over a socket and exits. Its namespace goes with
it: the copies the descriptors hold live on detached, like the mounts after ``umount -l``, and the
caller's ``umount LOWERFS`` succeeds at once. Everything the server opens later goes through these
descriptors and stays on the copies.

The server itself never leaves the caller's namespaces: it unmounts its own mount there when
signalled, and the owners it reads from the layers are the caller's view of them (in a user
namespace that maps one id, every other owner would read as the overflow id).

As root the child needs only CLONE_NEWNS. Anyone else needs a user namespace of their own for it; the
child maps no ids there, so no capability it holds in that namespace applies to any file
(capabilities count only on inodes whose owner and group are mapped): its access checks are the
caller's own, and a directory it may not open the server may not open either. Where the namespace
cannot be made (no user namespaces, a seccomp filter, EPERM) or any directory fails to open there,
the server opens them all itself as before (and reports its own errors).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct

from unionfs.core import fsat

log = logging.getLogger(__name__)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_STATUS = struct.Struct("i")  # 0 with one descriptor attached, else the errno of its open


def _enter_private_mount_namespace() -> None:
    """Give this (single-threaded, forked) process a private copy of the mount namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        if ctypes.get_errno() != 1 or libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:  # 1: EPERM
            raise OSError(ctypes.get_errno(), "unshare: " + os.strerror(ctypes.get_errno()))
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /: " + os.strerror(ctypes.get_errno()))


def _child(sock: socket.socket, paths: list[str]) -> None:
    """In the forked child: one message per path, in order (a failed set-up sends none)."""
    _enter_private_mount_namespace()
    for path in paths:
        try:
            fd = fsat.open(path, _DIR_FLAGS)
        except OSError as e:
            sock.send(_STATUS.pack(e.errno or 0))
            continue
        socket.send_fds(sock, [_STATUS.pack(0)], [fd])
        os.close(fd)


def open_directories(paths: list[str]) -> dict[str, int]:
    """Descriptors of ``paths`` (O_RDONLY|O_DIRECTORY|O_CLOEXEC) opened in a throwaway private mount
    namespace; the caller owns them. Empty when no namespace could be made or a path failed there."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError as e:
        parent_sock.close()
        child_sock.close()
        log.debug("layers opened in this mount namespace: fork: %s", e.strerror)
        return {}
    if pid == 0:
        code = 0
        try:
            parent_sock.close()
            _child(child_sock, paths)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    child_sock.close()
    opened: dict[str, int] = {}
    try:
        for path in paths:
            message, fds, _flags, _addr = socket.recv_fds(parent_sock, _STATUS.size, 1)
            if not message:  # the child gave up: no namespace
                break
            for fd in fds:
                os.set_inheritable(fd, False)
                if path in opened:  # the same directory named twice
                    os.close(fd)
                else:
                    opened[path] = fd
    finally:
        parent_sock.close()
        _, status = os.waitpid(pid, 0)
    if status != 0 or len(opened) != len(set(paths)):
        # All or none: rename, link and clone between two directories work only on one mount, so
        # upper and work (and a lower on the same filesystem) must come from the same namespace.
        log.debug("layers opened in this mount namespace (%d of %d opened in a private one, exit status %d)",
                  len(opened), len(set(paths)), status)
        for fd in opened.values():
            os.close(fd)
        return {}
    return opened
