"""Interop through a real registry with Debian's podman (as root): podman pulls and runs what lamina
pushed; lamina pulls what podman pushed and gets the same image ID and content."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import RunningRegistry, pulled_id, run_registry
from test_store_interop import Cli, lamina_image_with_two_layers, podman, run_podman

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")]

__all__ = ["podman"]  # the fixture, shared with the archive interop tests


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    with run_registry(tmp_path / "registry") as running:
        yield running


def test_podman_pulls_and_runs_what_lamina_pushed(podman: object, registry: RunningRegistry, lamina_cmd: Cli,
                                                  tmp_path: Path) -> None:
    image_id = lamina_image_with_two_layers(lamina_cmd, tmp_path)
    remote = f"{registry.address}/interop/app:1"
    lamina_cmd("push", "--tls-verify=false", "interop/app:1", remote)
    run_podman(podman, "pull", "--tls-verify=false", remote)
    podman_id = run_podman(podman, "inspect", "--format", "{{.Id}}", remote).stdout.decode().strip()
    assert podman_id == image_id
    out = run_podman(podman, "run", "--rm", "--network=none", remote).stdout.decode()
    assert out == "hello from lamina\n"
    script = "test ! -e /etc/group && stat -c '%u:%g %a' /srv/owned && /bin/busybox echo ok"
    out = run_podman(podman, "run", "--rm", "--network=none", remote, "sh", "-c", script).stdout.decode()
    assert out.split() == ["1000:1000", "600", "ok"]
    run_podman(podman, "rmi", "-f", remote)


def test_lamina_pulls_what_podman_pushed(podman: object, registry: RunningRegistry, lamina_cmd: Cli,
                                         tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        for name, data, mode in (("etc/os-release", b"ID=podman-made\n", 0o644), ("bin/tool", b"#!/bin/sh\n", 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, 0, 0
            tar.addfile(info, io.BytesIO(data))
    run_podman(podman, "import", "--change", 'CMD ["/bin/tool"]', str(rootfs), "localhost/podman-made:1")
    remote = f"{registry.address}/podman/made:1"
    run_podman(podman, "push", "--tls-verify=false", "localhost/podman-made:1", remote)
    podman_config = json.loads(run_podman(podman, "inspect", "localhost/podman-made:1").stdout)[0]

    root = tmp_path / "lamina-root"
    out = lamina_cmd("pull", "--tls-verify=false", remote, root=root)
    assert pulled_id(lamina_cmd, out, root=root) == podman_config["Id"].removeprefix("sha256:")
    got = json.loads(lamina_cmd("inspect", remote, root=root).stdout)[0]
    assert got["RootFS"]["Layers"] == podman_config["RootFS"]["Layers"]
    assert got["Config"]["Cmd"] == ["/bin/tool"]
    top = Path(got["GraphDriver"]["Data"]["LowerDir"].split(":")[0])
    assert (top / "etc" / "os-release").read_bytes() == b"ID=podman-made\n"
    assert lamina_cmd("system", "check", root=root).returncode == 0
    run_podman(podman, "rmi", "-f", "localhost/podman-made:1")
