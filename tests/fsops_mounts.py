"""The differential test's mounts: a kernel overlay or a FUSE union, used from here or from a worker
inside a user namespace. See tests/fsops.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsops_ops import _libc, apply_op, snapshot
from harness import REPO_ROOT, MountedUnion, force_unmount, start_union

# The worker is this test's command line (``fsops.py --worker``), run in its own namespaces.
FSOPS_MAIN = str(Path(__file__).with_name("fsops.py"))


# --- mounts --------------------------------------------------------------------------------------


@dataclass
class Union:
    """One mounted union (kernel or FUSE) over given directories."""

    kind: str  # "kernel", "lamina" or "fuse-overlayfs"
    lowers: list[Path]
    upper: Path
    work: Path
    mountpoint: Path
    log: Path
    extra: list[str] = field(default_factory=list)
    t0_ns: int = 0
    in_userns: bool = False
    handle: MountedUnion | None = None
    worker: subprocess.Popen[str] | None = None

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={':'.join(map(str, self.lowers))},upperdir={self.upper},workdir={self.work}"
        if self.kind == "kernel":
            # userxattr mounts refuse redirect_dir=on (the kernel never follows user.overlay.redirect).
            if "userxattr" not in self.extra:
                opts += ",redirect_dir=on"
            opts += "".join("," + o for o in self.extra)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.mountpoint)],
                           check=True, capture_output=True)
            if self.in_userns:
                # The oracle for a candidate used from a user namespace: the same kernel mount, used
                # by root of such a namespace (setuid/setgid clearing, for one, depends on the caller).
                self._start_worker([])
            return
        if self.extra:
            opts += "," + ",".join(self.extra)
        argv = (["fuse-overlayfs", "-f"] if self.kind == "fuse-overlayfs"
                else [sys.executable, "-m", "unionfs", "-f"]) + ["-o", opts, str(self.mountpoint)]
        if self.kind == "lamina-userns":
            # Served and used from inside a user namespace (uids 0..65535 mapped to themselves) with
            # its own mount namespace, as lamina's builder and runner mount it; a worker process in
            # there runs the operations (the mount is not reachable from outside).
            self._start_worker(argv)
            return
        self.handle = start_union(argv, self.mountpoint, self.log)

    def _start_worker(self, server_argv: list[str]) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, FSOPS_MAIN, "--worker", json.dumps(server_argv), str(self.mountpoint), str(self.log),
             str(self.t0_ns)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        if self._call({"cmd": "ping"}) != "ready":
            raise RuntimeError("the user-namespace worker did not start")

    def unmount(self) -> None:
        if self.kind == "kernel":
            self._stop_worker()
            subprocess.run(["umount", str(self.mountpoint)], check=False, capture_output=True)
            return
        self._stop_worker()
        if self.handle is not None:
            self.handle.unmount()
            self.handle = None
        force_unmount(self.mountpoint)

    def _stop_worker(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._call({"cmd": "quit"})
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
            self.worker = None

    def _call(self, request: dict[str, Any]) -> Any:
        assert self.worker is not None and self.worker.stdin is not None and self.worker.stdout is not None
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the user-namespace worker died (exit {self.worker.poll()})")
        return json.loads(line)

    def apply(self, op: list[Any]) -> Any:
        if self.worker is not None:
            return self._call({"cmd": "op", "op": op})
        return normalized(apply_op(str(self.mountpoint), op, self.t0_ns))

    def snap(self) -> tuple[dict[str, Any], dict[str, int], list[str]]:
        if self.worker is not None:
            tree, inos, problems = self._call({"cmd": "snapshot"})
            return tree, inos, problems
        tree, inos, problems = snapshot(str(self.mountpoint), self.t0_ns)
        return normalized(tree), inos, problems


def normalized(value: Any) -> Any:
    """The JSON form (tuples become lists), so local and worker results compare equal."""
    return json.loads(json.dumps(value))


CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def worker_main(argv_json: str, mountpoint: str, log: str, t0_ns: int) -> int:
    """Serve operations on a lamina mount made inside a new user + mount namespace.

    Reads one JSON request per line on stdin, answers one JSON line on stdout. The parent (root in
    the initial namespace) writes the child's uid/gid maps, as newuidmap would.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
            os._exit(90)
        os.write(ready_w, b"x")
        os.read(go_r, 1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os._exit(_serve(json.loads(argv_json), Path(mountpoint), Path(log), t0_ns))
    os.close(ready_w)
    os.close(go_r)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 65536\n")
    os.write(go_w, b"x")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _serve(argv: list[str], mountpoint: Path, log: Path, t0_ns: int) -> int:
    handle = start_union(argv, mountpoint, log) if argv else None
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request["cmd"] == "ping":
                answer: Any = "ready"
            elif request["cmd"] == "op":
                answer = apply_op(str(mountpoint), request["op"], t0_ns)
            elif request["cmd"] == "snapshot":
                answer = snapshot(str(mountpoint), t0_ns)
            else:
                break
            print(json.dumps(answer), flush=True)
    finally:
        if handle is not None:
            handle.unmount()
    print(json.dumps("bye"), flush=True)
    return 0
