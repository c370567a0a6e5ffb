"""Container networking: loopback, slirp4netns for outbound access, published ports.

``none`` gives the container a network namespace with only ``lo``; ``slirp`` (the default, alias
``bridge``) adds a tap device driven by slirp4netns in user mode (10.0.2.100/24, gateway 10.0.2.2,
DNS 10.0.2.3), which needs no privilege; ``host`` shares the host's namespace. Published ports
(``-p``) are slirp4netns host forwards added through its API socket.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ContainerError, UsageError

log = logging.getLogger(__name__)

NETWORK_MODES = ("slirp", "none", "host")
SLIRP_GUEST_IP = "10.0.2.100"
SLIRP_DNS = "10.0.2.3"

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def normalize_network(mode: str) -> str:
    """``slirp``, ``none``, ``host`` or ``container:NAME`` (the network namespace of another
    container, as docker's ``--network container:NAME``)."""
    mode = {"bridge": "slirp", "default": "slirp", "slirp4netns": "slirp"}.get(mode, mode)
    if mode.startswith("container:") and len(mode) > len("container:"):
        return mode
    if mode not in NETWORK_MODES:
        raise UsageError(f"--network: unknown network {mode!r} (use bridge, slirp4netns, host, none or "
                         "container:NAME)")
    return mode


@dataclass(frozen=True)
class PortMapping:
    host_ip: str
    host_port: int
    container_port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.container_port}/{self.proto}"

    def to_json(self) -> dict[str, object]:
        return {"host_ip": self.host_ip, "host_port": self.host_port,
                "container_port": self.container_port, "proto": self.proto}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> PortMapping:
        return cls(str(d["host_ip"]), int(d["host_port"]), int(d["container_port"]),  # type: ignore[call-overload]
                   str(d["proto"]))


_PORT_RE = re.compile(r"^(?:(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(?P<host>\d*):)?(?P<ctr>\d+)"
                      r"(?:/(?P<proto>tcp|udp))?$")


def parse_port(text: str) -> PortMapping:
    """``[[IP:]HOSTPORT:]CTRPORT[/tcp|udp]`` -> PortMapping (host port 0: a free one chosen at each
    start, as docker's random host port); UsageError naming the flag otherwise."""
    m = _PORT_RE.match(text)
    if not m:
        raise UsageError(f"-p {text}: expected [[IP:]HOSTPORT:]CONTAINERPORT[/tcp|udp]")
    host_port, ctr_port = int(m["host"] or 0), int(m["ctr"])
    if not (0 <= host_port < 65536 and 0 < ctr_port < 65536):
        raise UsageError(f"-p {text}: port out of range")
    ip = (m["ip"] or "0.0.0.0").strip("[]")
    return PortMapping(ip, host_port, ctr_port, m["proto"] or "tcp")


def free_host_port(host_ip: str, proto: str) -> int:
    """A port the kernel says is free on ``host_ip`` now (slirp4netns binds it right after)."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as s:
        s.bind((host_ip, 0))
        return int(s.getsockname()[1])


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


class Slirp:
    """A slirp4netns process serving the network namespace of ``pid``.

    Resource handling: owns the process and its API socket; :meth:`close` stops both (slirp4netns
    also exits by itself when the namespace's last process is gone).
    """

    def __init__(self, pid: int, api: bool = True) -> None:
        """``api``: give slirp4netns an API socket (needed to publish ports; without ports it is
        not made, which saves creating and removing its directory)."""
        # A short private directory: unix socket paths are limited to 108 bytes.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="lamina-slirp-")) if api else None
        self.api_socket = self._socket_dir / "api.sock" if self._socket_dir is not None else None
        ready_r, ready_w = os.pipe()
        self._exit_r, self._exit_w = os.pipe()
        args = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                *([f"--api-socket={self.api_socket}"] if self.api_socket is not None else []),
                f"--ready-fd={ready_w}", f"--exit-fd={self._exit_r}", str(pid), "tap0"]
        try:
            self.process = subprocess.Popen(args, pass_fds=(ready_w, self._exit_r), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            start_new_session=True)
        except OSError as e:
            os.close(ready_r)
            os.close(ready_w)
            self._remove_socket_dir()
            raise ContainerError(f"cannot start slirp4netns: {e.strerror}") from e
        finally:
            os.close(self._exit_r)
        os.close(ready_w)
        self._ready_r = ready_r

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([self._ready_r], [], [], 0.05)
                if ready:
                    if os.read(self._ready_r, 1):
                        return
                    break
                if self.process.poll() is not None or time.monotonic() > deadline:
                    break
        finally:
            os.close(self._ready_r)
        if self.process.poll() is None:
            self.process.kill()
        # Read what it said before close() closes the pipe (its end of file: the process is gone).
        err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
        self.close()
        raise ContainerError(f"slirp4netns did not start: {err or 'timeout'}")

    def add_port(self, port: PortMapping) -> None:
        if self.api_socket is None:
            raise ContainerError(f"cannot publish port {port}: slirp4netns was started without its API socket")
        request = {"execute": "add_hostfwd",
                   "arguments": {"proto": port.proto, "host_addr": port.host_ip, "host_port": port.host_port,
                                 "guest_addr": SLIRP_GUEST_IP, "guest_port": port.container_port}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.api_socket))
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        answer = json.loads(reply or b"{}")
        if "error" in answer:
            desc = answer["error"].get("desc", answer["error"]) if isinstance(answer["error"], dict) else answer["error"]
            raise ContainerError(f"cannot publish port {port}: {desc}")

    def close(self) -> None:
        """Tell slirp4netns to go (its exit descriptor) without waiting for it: it takes 15-30 ms
        to exit, which was the largest part of ``run --rm``'s time after the command ended. One
        still exiting is reaped later: by :mod:`subprocess` when this process starts its next
        child, or by init once lamina exits (it runs in its own session, so nothing waits on it)."""
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        self.process.poll()
        if self.process.stderr:
            self.process.stderr.close()
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
