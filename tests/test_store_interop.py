"""Interop with the real tools (Debian's podman 4.3 and skopeo, as root): what lamina saves, podman
loads and runs and skopeo reads; what podman saves, lamina loads (and runs, once the runner can)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT

Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def podman() -> Iterator[object]:
    if os.geteuid() != 0:
        pytest.skip("podman interop runs as root")
    if shutil.which("podman") is None or shutil.which("skopeo") is None:
        pytest.skip("podman or skopeo is not installed")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.podman_env import PodmanUnavailable, open_podman_env

    try:
        with open_podman_env(storage_driver="vfs") as env:
            probe = env.run(["info"], check=False)
            if probe.returncode != 0:
                pytest.skip(f"podman cannot run here: {probe.stderr.decode(errors='replace')[-300:]}")
            yield env
    except PodmanUnavailable as e:
        pytest.skip(f"podman cannot run here: {e}")


def run_podman(env: object, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = env.run(list(args), check=False)  # type: ignore[attr-defined]
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.decode(errors='replace')[-2000:]}")
    return result


def lamina_image_with_two_layers(lamina_cmd: Cli, tmp_path: Path) -> str:
    """busybox base + a layer that adds a file, deletes /etc/group and owns a file as 1000:1000."""
    from lamina.store import Store
    from unionfs.core import ondisk

    root = tmp_path / "lamina-root"
    store = Store.open(root)
    base = store.resolve_image("lamina/busybox")
    upper = tmp_path / "upper"
    (upper / "srv").mkdir(parents=True)
    (upper / "srv/hello").write_text("hello from lamina\n")
    (upper / "srv/owned").write_text("mine\n")
    ondisk.write_owner_override(str(upper / "srv/owned"), ondisk.OwnerOverride(1000, 1000, 0o600))
    (upper / "etc").mkdir()
    fd = os.open(upper / "etc", os.O_RDONLY)
    try:
        ondisk.make_whiteout(fd, "group")
    finally:
        os.close(fd)
    layer = store.commit_layer(upper)
    config = json.loads(json.dumps(base.config))
    config["config"]["Cmd"] = ["cat", "/srv/hello"]
    config["history"].append({"created_by": "lamina test layer"})
    image = store.create_image(base.layers + [layer], config, tags=["interop/app:1"], base=base)
    return image.id


def test_lamina_save_is_loaded_and_run_by_podman_and_read_by_skopeo(podman: object, lamina_cmd: Cli,
                                                                     tmp_path: Path) -> None:
    image_id = lamina_image_with_two_layers(lamina_cmd, tmp_path)
    for fmt in ("docker-archive", "oci-archive"):
        archive = tmp_path / f"app-{fmt}.tar"
        lamina_cmd("save", "--format", fmt, "-o", str(archive), "interop/app:1")
        inspected = subprocess.run(["skopeo", "inspect", f"{fmt}:{archive}"], capture_output=True, text=True)
        assert inspected.returncode == 0, inspected.stderr
        doc = json.loads(inspected.stdout)
        assert len(doc["Layers"]) == 2 and doc["Os"] == "linux"
        config = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"{fmt}:{archive}"],
                                           capture_output=True, text=True, check=True).stdout)
        assert config["config"]["Cmd"] == ["cat", "/srv/hello"]
        loaded = run_podman(podman, "load", "-i", str(archive)).stdout.decode()
        assert "Loaded image" in loaded
        name = loaded.strip().split("Loaded image: ")[-1].strip()
        podman_id = run_podman(podman, "inspect", "--format", "{{.Id}}", name).stdout.decode().strip()
        assert podman_id == image_id, "podman computes the same image ID from the same config"
        out = run_podman(podman, "run", "--rm", "--network=none", name).stdout.decode()
        assert out == "hello from lamina\n"
        script = "test ! -e /etc/group && stat -c '%u:%g %a' /srv/owned && /bin/busybox echo ok"
        out = run_podman(podman, "run", "--rm", "--network=none", name, "sh", "-c", script).stdout.decode()
        assert out.split() == ["1000:1000", "600", "ok"]
        run_podman(podman, "rmi", "-f", name)


def test_podman_save_is_loaded_by_lamina(podman: object, lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    base_archive = tmp_path / "base.tar"
    lamina_cmd("save", "-o", str(base_archive), "lamina/busybox", root=root)
    run_podman(podman, "load", "-i", str(base_archive))
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(
        "FROM localhost/lamina/busybox:latest\n"
        "RUN echo made by podman > /made-by && rm /etc/group && mkdir -p /d && touch /d/f\n"
        'CMD ["cat", "/made-by"]\n')
    run_podman(podman, "build", "--pull=never", "--network=none", "-t", "localhost/from-podman:1", str(context))
    podman_config = json.loads(run_podman(podman, "inspect", "localhost/from-podman:1").stdout)[0]
    for fmt in ("docker-archive", "oci-archive"):
        archive = tmp_path / f"podman-{fmt}.tar"
        run_podman(podman, "save", "--format", fmt, "-o", str(archive), "localhost/from-podman:1")
        target = tmp_path / f"root-{fmt}"
        out = lamina_cmd("load", "-i", str(archive), root=target).stdout
        assert "from-podman:1" in out
        got = json.loads(lamina_cmd("inspect", "localhost/from-podman:1", root=target).stdout)[0]
        assert got["Id"] == "sha256:" + podman_config["Id"]
        assert got["RootFS"]["Layers"] == podman_config["RootFS"]["Layers"]
        assert got["Config"]["Cmd"] == ["cat", "/made-by"]
        lowers = [Path(p) for p in got["GraphDriver"]["Data"]["LowerDir"].split(":")]
        top = lowers[0]
        assert (top / "made-by").read_text() == "made by podman\n"
        group = top / "etc/group"
        assert (group.is_char_device() and os.stat(group).st_rdev == 0) or (top / "etc/.wh.group").exists()
        assert lamina_cmd("system", "check", root=target).returncode == 0
        if lamina_can_run(lamina_cmd):
            ran = lamina_cmd("run", "--rm", "localhost/from-podman:1", root=target, check=False)
            assert ran.stdout == "made by podman\n", ran.stderr


def lamina_can_run(lamina_cmd: Cli) -> bool:
    """The runner's `lamina run` exists (it is another package's verb)."""
    return lamina_cmd("run", "--help", check=False).returncode == 0
