"""Running containers from a lazy image (``lamina run REGISTRY/REPO:TAG`` of an eStargz image before
it is pulled): what the container sees against podman after a normal pull, the background fill
against ``lamina pull`` of the same reference, offline runs, a registry that goes away mid-fill,
corrupt bytes, ``--lazy=false``, and an unprivileged user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_server import RunningRegistry, _wait_until_up
from test_store_estargz import registry
from test_store_interop import lamina_image_with_two_layers, podman, run_podman

from lamina.lazy.partial import PartialBlob, gaps, merge

__all__ = ["podman", "registry"]  # the fixtures

Cli = Callable[..., "subprocess.CompletedProcess[str]"]
# What a container shows of the two-layer image: a file of the top layer, a whiteout of the base's
# /etc/group, an owner override of the top layer, a 0700 directory of the base.
SCRIPT = "cat /srv/hello; test ! -e /etc/group && stat -c '%u:%g %a' /srv/owned /root"
NO_FILL = {"LAMINA_LAZY_FILL": "0"}
_BLOB_GET = re.compile(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP/[\d.]+" (200|206) (\d+)')


def blob_traffic(registry: RunningRegistry) -> list[tuple[str, int, int]]:
    """(digest, status, bytes sent) of every blob GET so far, from the registry's access log."""
    return [(m[1], int(m[2]), int(m[3])) for m in _BLOB_GET.finditer(registry.log_path.read_text(errors="replace"))]


def inspect(lamina_cmd: Cli, root: Path, ref: str) -> dict:
    result: dict = json.loads(lamina_cmd("inspect", ref, root=root).stdout)[0]
    return result


def wait_until_filled(lamina_cmd: Cli, root: Path, ref: str, timeout: float = 120) -> dict:
    """The image's inspect once it is an ordinary image (no ``Lazy`` field)."""
    deadline = time.monotonic() + timeout
    while True:
        found = inspect(lamina_cmd, root, ref)
        if "Lazy" not in found:
            return found
        assert time.monotonic() < deadline, f"not filled within {timeout} s: {found['Lazy']}"
        time.sleep(0.2)


def restart(registry: RunningRegistry) -> subprocess.Popen[bytes]:
    """The same registry (same port, same storage) started again after it was stopped."""
    log_file = open(registry.log_path, "ab")
    process = subprocess.Popen([shutil.which("docker-registry") or "docker-registry", "serve",
                                str(registry.log_path.parent / "config.yml")],
                               stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log_file.close()
    registry.process = process
    _wait_until_up(registry, False, 20)
    return process


def test_partial_ranges_merge_and_gaps(tmp_path: Path) -> None:
    assert merge([(5, 7), (0, 5), (9, 10), (6, 8)]) == [(0, 8), (9, 10)]
    assert gaps([(2, 5)], 12, 4) == [(0, 2), (5, 9), (9, 12)]
    assert gaps([(0, 12)], 12, 4) == []
    partial = PartialBlob(tmp_path / "blobs", "sha256:" + "a" * 64)
    partial.write(4, b"5678")
    partial.write(0, b"1234")
    assert partial.present() == [(0, 8)] and partial.missing(10, 100) == [(8, 10)]
    assert not partial.take(10, tmp_path / "taken")  # not whole: stays
    partial.write(8, b"90")
    assert partial.take(10, tmp_path / "taken") and (tmp_path / "taken").read_bytes() == b"1234567890"
    assert not partial.data_path.exists() and not partial.log_path.exists()


@pytest.mark.root
@pytest.mark.slow
def test_lazy_run_shows_what_podman_runs_and_fills_into_a_pulled_image(
        podman: object, registry: RunningRegistry, lamina_cmd: Cli, tmp_path: Path) -> None:
    lamina_image_with_two_layers(lamina_cmd, tmp_path)
    ref = f"{registry.address}/lazy/app:1"
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "interop/app:1", ref)
    run_podman(podman, "pull", "--tls-verify=false", ref)
    expected = run_podman(podman, "run", "--rm", "--network=none", ref, "sh", "-c", SCRIPT).stdout.decode()
    assert expected.splitlines() == ["hello from lamina", "1000:1000 600", "0:0 700"]

    lazy_root = tmp_path / "lazy-root"
    seen = len(blob_traffic(registry))
    ran = lamina_cmd("run", "--rm", "--network=none", ref, "sh", "-c", SCRIPT, root=lazy_root, env=NO_FILL)
    assert ran.stdout == expected
    image = inspect(lamina_cmd, lazy_root, ref)
    config_digest = image["Id"]
    layer_digests = [layer["digest"] for layer in image["Manifest"]["layers"]]
    # No layer blob was fetched whole: only ranges of them (and the config, whole).
    assert {d for d, status, _n in blob_traffic(registry)[seen:] if status == 200} == {config_digest}
    assert 0 < image["Lazy"]["PresentBytes"] < image["Lazy"]["TotalBytes"] == sum(
        layer["size"] for layer in image["Manifest"]["layers"])
    listed = lamina_cmd("images", root=lazy_root).stdout.splitlines()
    assert listed[0].split()[-1] == "PRESENT" and listed[1].split()[-1].endswith("%"), listed
    row = json.loads(lamina_cmd("images", "--format", "json", root=lazy_root).stdout)
    assert row["ID"] == config_digest[7:19] and row["Present"] == listed[1].split()[-1]

    # A second run fills the image in the background: then it is what `lamina pull` makes of it.
    lamina_cmd("run", "--rm", "--network=none", ref, "true", root=lazy_root)
    filled = wait_until_filled(lamina_cmd, lazy_root, ref)
    pulled_root = tmp_path / "pulled-root"
    lamina_cmd("pull", "-q", "--tls-verify=false", ref, root=pulled_root)
    pulled = inspect(lamina_cmd, pulled_root, ref)
    for field in ("Id", "Digest", "RootFS", "Config", "RepoTags"):
        assert filled[field] == pulled[field], field
    assert [layer["digest"] for layer in filled["Manifest"]["layers"]] == layer_digests
    podman_id = run_podman(podman, "image", "inspect", "--format", "{{.Id}}", ref).stdout.decode().strip()
    assert filled["Id"] == "sha256:" + podman_id
    assert "PRESENT" not in lamina_cmd("images", root=lazy_root).stdout
    assert not list((lazy_root / "lazy" / "images").iterdir())
    assert not list((lazy_root / "lazy" / "blobs").iterdir())

    # Offline: the registry is gone, the image runs from the store.
    registry.process.terminate()
    registry.process.wait()
    again = lamina_cmd("run", "--rm", "--network=none", ref, "sh", "-c", SCRIPT, root=lazy_root)
    assert again.stdout == expected


@pytest.mark.root
@pytest.mark.slow
def test_lazy_false_pulls_the_image_whole(registry: RunningRegistry, lamina_cmd: Cli, tmp_path: Path) -> None:
    ref = f"{registry.address}/lazy/bb:1"
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "lamina/busybox", ref)
    root = tmp_path / "other"
    ran = lamina_cmd("run", "--rm", "--lazy=false", "--network=none", ref, "echo", "ok", root=root)
    assert ran.stdout == "ok\n"
    assert [status for _d, status, _n in blob_traffic(registry)] == [200, 200]  # config, layer: whole
    assert "Lazy" not in inspect(lamina_cmd, root, ref)
    assert not (root / "lazy" / "images").exists() or not list((root / "lazy" / "images").iterdir())


def data_image(lamina_cmd: Cli, tmp_path: Path, ref: str, prioritized: tuple[str, ...] = ()) -> None:
    """busybox and a layer of three 3 MiB random files, pushed to ``ref`` as eStargz."""
    context = tmp_path / "context"
    (context / "data").mkdir(parents=True)
    for i in range(3):
        (context / "data" / f"f{i}").write_bytes(os.urandom(3 << 20))
    (context / "Dockerfile").write_text("FROM lamina/busybox\nCOPY data /data\n")
    lamina_cmd("build", "-q", "-t", "lazy/data:1", str(context))
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz",
               *(f"--estargz-prioritize={path}" for path in prioritized), "lazy/data:1", ref)


@pytest.mark.root
@pytest.mark.slow
def test_the_prioritized_files_are_prefetched(registry: RunningRegistry, lamina_cmd: Cli, tmp_path: Path) -> None:
    ref = f"{registry.address}/lazy/data:1"
    data_image(lamina_cmd, tmp_path, ref, prioritized=("/data/f2",))
    root = tmp_path / "lazy-root"
    lamina_cmd("run", "--rm", "--network=none", ref, "true", root=root, env=NO_FILL)
    # `true` read nothing of /data; the server fetched f2 (3 MiB of random bytes) on its own.
    deadline = time.monotonic() + 60
    while inspect(lamina_cmd, root, ref)["Lazy"]["PresentBytes"] < 3 << 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    present = inspect(lamina_cmd, root, ref)["Lazy"]["PresentBytes"]
    assert 3 << 20 <= present < 6 << 20
    seen = len(blob_traffic(registry))
    ran = lamina_cmd("run", "--rm", "--network=none", ref, "sh", "-c", "wc -c < /data/f2", root=root, env=NO_FILL)
    assert ran.stdout.strip() == str(3 << 20)
    # Read from the cache: no chunk of f2 fetched again (only the TOCs of the new mount).
    assert sum(n for _d, _s, n in blob_traffic(registry)[seen:]) < 1 << 20


@pytest.mark.root
@pytest.mark.slow
def test_a_registry_gone_mid_fill_gives_eio_in_time_and_a_later_run_resumes(
        registry: RunningRegistry, lamina_cmd: Cli, tmp_path: Path) -> None:
    ref = f"{registry.address}/lazy/data:1"
    data_image(lamina_cmd, tmp_path, ref)
    root = tmp_path / "lazy-root"
    env = {**NO_FILL, "LAMINA_LAZY_DEADLINE": "3"}
    # One file read: its chunk is cached and its bytes are kept for the fill.
    lamina_cmd("run", "--rm", "--network=none", ref, "sh", "-c", "head -c 10 /data/f0 | wc -c", root=root, env=env)
    before = inspect(lamina_cmd, root, ref)["Lazy"]
    lamina_cmd("run", "-d", "--name", "reader", "--network=none", ref, "sleep", "300", root=root, env=env)
    try:
        registry.process.terminate()
        registry.process.wait()
        started = time.monotonic()
        missing = lamina_cmd("exec", "reader", "cat", "/data/f2", root=root, check=False, timeout=60)
        assert missing.returncode != 0 and "Input/output error" in missing.stderr, missing
        assert time.monotonic() - started < 30
        # What is here is still served.
        have = lamina_cmd("exec", "reader", "sh", "-c", "wc -c < /data/f0", root=root)
        assert have.stdout.strip() == str(3 << 20)
    finally:
        lamina_cmd("rm", "-f", "reader", root=root, check=False)
    # Still lazy, nothing lost.
    assert inspect(lamina_cmd, root, ref)["Lazy"]["PresentBytes"] == before["PresentBytes"]
    process = restart(registry)
    try:
        sent_before = sum(n for _d, _s, n in blob_traffic(registry))
        lamina_cmd("run", "--rm", "--network=none", ref, "true", root=root)
        filled = wait_until_filled(lamina_cmd, root, ref)
        # The fill fetched what was missing, not what the first run had fetched already.
        sent = sum(n for _d, _s, n in blob_traffic(registry)) - sent_before
        assert sent <= before["TotalBytes"] - before["PresentBytes"] + (64 << 10), (sent, before)
        pulled_root = tmp_path / "pulled-root"
        lamina_cmd("pull", "-q", "--tls-verify=false", ref, root=pulled_root)
        pulled = inspect(lamina_cmd, pulled_root, ref)
        assert (filled["Id"], filled["RootFS"]) == (pulled["Id"], pulled["RootFS"])
    finally:
        process.terminate()
        process.wait()


@pytest.mark.root
@pytest.mark.slow
def test_corrupt_bytes_are_never_served_nor_imported(registry: RunningRegistry, lamina_cmd: Cli,
                                                     tmp_path: Path) -> None:
    ref = f"{registry.address}/lazy/data:1"
    data_image(lamina_cmd, tmp_path, ref)
    root = tmp_path / "lazy-root"
    lamina_cmd("run", "--rm", "--network=none", ref, "sh", "-c", "head -c 10 /data/f0 | wc -c", root=root, env=NO_FILL)
    # A bit flipped in every cached chunk and in the kept bytes of the blob being filled.
    for path in [*(root / "lazy" / "chunks").iterdir(), *(root / "lazy" / "blobs").glob("*.partial")]:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    env = {**NO_FILL, "LAMINA_LAZY_DEADLINE": "3"}
    lamina_cmd("run", "-d", "--name", "reader", "--network=none", ref, "sleep", "300", root=root, env=env)
    try:
        registry.process.terminate()
        registry.process.wait()
        # The registry is gone and the only copy of f0's chunk is the corrupt one: EIO, not its bytes.
        read = lamina_cmd("exec", "reader", "cat", "/data/f0", root=root, check=False)
        assert read.returncode != 0 and "Input/output error" in read.stderr and not read.stdout, read
    finally:
        lamina_cmd("rm", "-f", "reader", root=root, check=False)
    process = restart(registry)
    try:
        # Online again: the chunk is fetched anew; the corrupt blob is refused by the store, refilled.
        read = lamina_cmd("run", "--rm", "--network=none", ref, "sh", "-c", "cat /data/f0 | wc -c", root=root)
        assert read.stdout.strip() == str(3 << 20)
        lamina_cmd("run", "--rm", "--network=none", ref, "true", root=root)
        deadline = time.monotonic() + 120
        while "Lazy" in inspect(lamina_cmd, root, ref) and time.monotonic() < deadline:
            lamina_cmd("run", "--rm", "--network=none", ref, "true", root=root)  # the next fill starts over
            time.sleep(0.5)
        assert "Lazy" not in inspect(lamina_cmd, root, ref)
        check = lamina_cmd("system", "check", root=root, check=False)
        assert check.returncode == 0, check
    finally:
        process.terminate()
        process.wait()


@pytest.mark.unprivileged
@pytest.mark.slow
def test_lazy_run_as_an_unprivileged_user_sees_what_a_pulled_run_sees(
        unpriv: object, registry: RunningRegistry, lamina_cmd: Cli, tmp_path: Path) -> None:
    """Rootless, with and without subordinate ids: owners, modes, whiteouts and contents of the
    lazy run are those of a run of the same image pulled first (by the same user)."""
    lamina_image_with_two_layers(lamina_cmd, tmp_path)
    ref = f"{registry.address}/lazy/app:1"
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "interop/app:1", ref)
    user = unpriv
    script = SCRIPT + "; sha256sum /bin/busybox"
    lazy = user.lamina("--root", str(user.workdir / "lazy"), "run", "--rm", "--network=none",  # type: ignore[attr-defined]
                       ref, "sh", "-c", script, env=NO_FILL)
    assert lazy.returncode == 0, lazy.stderr
    shown = user.lamina("--root", str(user.workdir / "lazy"), "inspect", "--format", "{{.Lazy.Percent}}", ref)  # type: ignore[attr-defined]
    assert shown.returncode == 0 and float(shown.stdout) < 100, shown
    pulled = user.lamina("--root", str(user.workdir / "pulled"), "run", "--rm", "--lazy=false",  # type: ignore[attr-defined]
                         "--network=none", ref, "sh", "-c", script)
    assert pulled.returncode == 0, pulled.stderr
    assert lazy.stdout == pulled.stdout and lazy.stdout.startswith("hello from lamina\n")


@pytest.mark.root
@pytest.mark.slow
def test_from_commit_and_rmi_of_a_lazy_image(registry: RunningRegistry, lamina_cmd: Cli, tmp_path: Path) -> None:
    """FROM reads the base lazily and fills it before the commit; so does `commit` of a container;
    both images then stand on the base's pulled layers. rmi forgets a lazy image."""
    ref = f"{registry.address}/lazy/data:1"
    data_image(lamina_cmd, tmp_path, ref)
    pulled_root = tmp_path / "pulled-root"
    lamina_cmd("pull", "-q", "--tls-verify=false", ref, root=pulled_root)
    base_layers = inspect(lamina_cmd, pulled_root, ref)["RootFS"]["Layers"]

    built_root = tmp_path / "built-root"
    context = tmp_path / "derived"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {ref}\nRUN wc -c < /data/f1 > /size\n")
    seen = len(blob_traffic(registry))
    lamina_cmd("build", "-q", "-t", "derived:1", str(context), root=built_root, env=NO_FILL)
    # The RUN step read by ranges; the fill before the commit took the rest by ranges too.
    config_digest = inspect(lamina_cmd, built_root, ref)["Id"]
    assert {status for digest, status, _n in blob_traffic(registry)[seen:] if digest != config_digest} == {206}
    assert inspect(lamina_cmd, built_root, "derived:1")["RootFS"]["Layers"][:-1] == base_layers
    assert "Lazy" not in inspect(lamina_cmd, built_root, ref)
    ran = lamina_cmd("run", "--rm", "--network=none", "derived:1", "cat", "/size", root=built_root)
    assert ran.stdout.strip() == str(3 << 20)

    committed_root = tmp_path / "committed-root"
    lamina_cmd("create", "--name", "c", "--network=none", ref, "sh", "-c", "echo hi > /hi", root=committed_root,
               env=NO_FILL)
    lamina_cmd("start", "-a", "c", root=committed_root, env=NO_FILL)
    assert "Lazy" in inspect(lamina_cmd, committed_root, ref)
    lamina_cmd("commit", "c", "committed:1", root=committed_root)
    assert inspect(lamina_cmd, committed_root, "committed:1")["RootFS"]["Layers"][:-1] == base_layers
    ran = lamina_cmd("run", "--rm", "--network=none", "committed:1", "cat", "/hi", root=committed_root)
    assert ran.stdout == "hi\n"

    removed_root = tmp_path / "removed-root"
    lamina_cmd("run", "--rm", "--network=none", ref, "true", root=removed_root, env=NO_FILL)
    assert "PRESENT" in lamina_cmd("images", root=removed_root).stdout
    lamina_cmd("rmi", ref, root=removed_root)
    assert lamina_cmd("images", "-q", root=removed_root).stdout == ""
    assert not list((removed_root / "lazy" / "images").iterdir())
    assert not list((removed_root / "lazy" / "blobs").iterdir())
