"""Hostile input, end to end as root: every input is read with a limit, and bad input is refused.

Issue 13's items 4 (unbounded reads), 5 (decompression bombs) and 7 (tracebacks and silent
successes), and the CVE-2019-14271 class (a host process loading an image's NSS modules). Every
refusal is one line ``lamina: error: ...`` naming the input (and the limit), docker's exit code
(125), no traceback, and the store exactly as it was (compared file by file).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import REPO_ROOT, docker_error_code, fuse_mounts_under
from test_e2e_bad_input import tar_bytes
from test_e2e_bad_input import tree as raw_tree

pytestmark = [pytest.mark.root, pytest.mark.fuse]

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
BASE = "lamina/busybox"
GiB = 1 << 30


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """The store's files, once the removals ``run --rm`` finishes in the background are done."""
    import time

    deadline = time.monotonic() + 30
    while any(p.name.startswith(".removing-") for p in (root / "containers").glob(".removing-*")):
        assert time.monotonic() < deadline, "a container removal did not finish"
        time.sleep(0.05)
    return raw_tree(root)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_archive(index: object, blobs: list[bytes]) -> bytes:
    """An oci-archive whose index.json is ``index`` and whose blobs are ``blobs``."""
    entries: list[tuple[str, str, bytes | str]] = [
        ("oci-layout", "file", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", "file", json.dumps(index).encode()),
        ("blobs", "dir", ""), ("blobs/sha256", "dir", "")]
    entries += [(f"blobs/sha256/{sha256(b)[7:]}", "file", b) for b in blobs]
    return tar_bytes(entries)


def oci_image_archive(manifest_of: Callable[[dict, bytes], object],
                      index_of: Callable[[bytes], object] | None = None) -> bytes:
    """An oci-archive of one image whose manifest is ``manifest_of(good_manifest, layer)``."""
    layer = tar_bytes([("f", "file", b"x")])
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]}}).encode()
    good = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                        "size": len(layer)}]}
    manifest = json.dumps(manifest_of(good, layer)).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(manifest),
            "size": len(manifest), "annotations": {"io.containerd.image.name": "evil/img:latest"}}
    index = index_of(manifest) if index_of else {"schemaVersion": 2, "manifests": [desc]}
    return oci_archive(index, [layer, config, manifest])


LAYER = tar_bytes([("f", "file", b"x")])
GOOD_CONFIG = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(LAYER)]}}
GOOD_ENTRY = {"Config": "c.json", "RepoTags": ["evil/img:latest"], "Layers": ["l/layer.tar"]}


def docker_config_archive(config: object = GOOD_CONFIG, manifest: object = (GOOD_ENTRY,)) -> bytes:
    """A docker-archive of one layer, with ``config`` as c.json and ``manifest`` as manifest.json."""
    return tar_bytes([("c.json", "file", json.dumps(config).encode()), ("l", "dir", ""),
                      ("l/layer.tar", "file", LAYER), ("manifest.json", "file", json.dumps(manifest).encode())])


def docker_manifest_archive(manifest: object) -> bytes:
    return docker_config_archive(manifest=manifest)


def with_layer(manifest: dict, **changes: object) -> dict:
    return {**manifest, "layers": [{**manifest["layers"][0], **changes}]}


ARCHIVES: dict[str, tuple[Callable[[], bytes], str]] = {
    # docker-archive: manifest.json and config of the wrong JSON types
    "docker-config-not-string": (lambda: docker_manifest_archive(
        [{"Config": 5, "RepoTags": [], "Layers": ["l/layer.tar"]}]), "Config"),
    "docker-repotags-number": (lambda: docker_manifest_archive(
        [{"Config": "c.json", "RepoTags": [5], "Layers": ["l/layer.tar"]}]), "RepoTags"),
    "docker-layers-object": (lambda: docker_manifest_archive(
        [{"Config": "c.json", "RepoTags": [], "Layers": {"a": 1}}]), "Layers"),
    "docker-entry-string": (lambda: docker_manifest_archive(["x"]), "manifest.json"),
    "docker-manifest-empty": (lambda: docker_manifest_archive([]), "manifest.json"),
    "docker-rootfs-string": (lambda: docker_config_archive(
        {"architecture": "amd64", "os": "linux", "rootfs": "x"}), "rootfs"),
    "docker-diff-ids-numbers": (lambda: docker_config_archive(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [5]}}), "diff_ids"),
    "docker-config-array": (lambda: docker_config_archive([1, 2]), "c.json"),
    # oci-archive: index, manifest and descriptors of the wrong types or lying
    "oci-manifests-strings": (lambda: oci_image_archive(lambda m, layer: m, lambda m: {"manifests": ["x"]}),
                              "manifests"),
    "oci-index-empty": (lambda: oci_image_archive(lambda m, layer: m, lambda m: {"manifests": []}),
                        "index.json"),
    "oci-manifest-config-number": (lambda: oci_image_archive(lambda m, layer: {**m, "config": 5}), "config"),
    "oci-manifest-layers-strings": (lambda: oci_image_archive(lambda m, layer: {**m, "layers": ["a"]}),
                                    "layers"),
    "oci-descriptor-size-lies": (lambda: oci_image_archive(
        lambda m, layer: with_layer(m, size=len(layer) + 7)), "size"),
    "oci-descriptor-size-negative": (lambda: oci_image_archive(
        lambda m, layer: with_layer(m, size=-1)), "size"),
    "oci-config-size-lies": (lambda: oci_image_archive(
        lambda m, layer: {**m, "config": {**m["config"], "size": 3}}), "size"),
    "oci-digest-not-sha256": (lambda: oci_image_archive(
        lambda m, layer: with_layer(m, digest="md5:abc")), "digest"),
}


@dataclass(frozen=True)
class Store:
    root: Path
    inputs: Path
    run: Lamina


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    base = tmp_path_factory.mktemp("security-input")
    root = base / "root"
    inputs = base / "inputs"
    inputs.mkdir()

    def run(*args: str, limit_memory: int | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
        def preexec() -> None:
            if limit_memory is not None:
                # Before the fix these commands grew without bound: never let one take the machine.
                resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))
        argv = [sys.executable, "-m", "lamina", "--root", str(root), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL, preexec_fn=preexec, **kwargs)  # type: ignore[call-overload]

    assert run("images").returncode == 0
    # The base image exists, and a container (not --rm: its removal would finish in the background).
    assert run("run", "--name", "keeper", BASE, "true").returncode == 0
    yield Store(root, inputs, run)
    run("rm", "-f", "keeper")
    assert fuse_mounts_under(root) == []


def assert_refused(store: Store, result: subprocess.CompletedProcess[str], expect: str,
                   before: dict[str, tuple[int, int, int]], code: int | None = None) -> str:
    """One error line containing ``expect``, exit ``code`` (default: docker's for the command), no
    traceback, the store unchanged."""
    assert "Traceback" not in result.stderr, result.stderr
    expected = docker_error_code(result.args) if code is None else code
    assert result.returncode == expected, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("lamina: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert expect in errors[0], errors[0]
    after = tree(store.root)
    assert {k: v for k, v in after.items() if k not in before} == {}, "files appeared in the store"
    assert {k: v for k, v in before.items() if after.get(k) != v} == {}, "files changed in the store"
    return errors[0]


# --- item 7: archives whose JSON has the wrong types, or lies ----------------------------------


@pytest.mark.parametrize("name", list(ARCHIVES))
def test_load_refuses_malformed_archive_json(name: str, store: Store) -> None:
    make, expect = ARCHIVES[name]
    if name == "docker-config-not-string":
        # The archives are well formed apart from the one lie: the good one loads.
        good = store.inputs / "good.tar"
        good.write_bytes(docker_config_archive())
        assert store.run("load", "-i", str(good)).returncode == 0
        assert store.run("rmi", "evil/img:latest").returncode == 0
        assert store.run("system", "prune", "-f").returncode == 0
    path = store.inputs / f"{name}.tar"
    path.write_bytes(make())
    before = tree(store.root)
    result = store.run("load", "-i", str(path))
    if result.returncode == 0:
        store.run("rmi", "-f", "evil/img:latest")
        store.run("system", "prune", "-f")
    line = assert_refused(store, result, expect, before)
    assert str(path) in line


# --- item 4: every input a user or an image controls is read with a limit -----------------------


def peak_rss_kib(store: Store, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run lamina; return its result and the largest resident size any of its processes reached."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "lamina", "--root",
                             str(store.root), *args], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    *rest, peak = result.stderr.splitlines()
    result.stderr = "".join(line + "\n" for line in rest)
    return result, int(peak)


def oversized_inputs(inputs: Path) -> dict[str, tuple[tuple[str, ...], str]]:
    """Name -> (argv, fragment of the error line)."""
    (inputs / "big.env").write_bytes((b"#" + b"x" * 65_000 + b"\n") * 260)  # 16.1 MiB of comments
    (inputs / "long-line.env").write_bytes(b"A=" + b"x" * (64 << 10) + b"\n")
    (inputs / "ctx-zero-ignore").mkdir()
    (inputs / "ctx-zero-ignore" / "Dockerfile").write_text("FROM lamina/busybox\n")
    (inputs / "ctx-zero-ignore" / ".dockerignore").symlink_to("/dev/zero")
    (inputs / "ctx").mkdir()
    big_manifest = [{**GOOD_ENTRY, "RepoTags": ["evil/img:latest"] + [f"evil/pad:{i}" for i in range(80_000)]}]
    (inputs / "big-manifest.tar").write_bytes(docker_config_archive(manifest=big_manifest))
    padded_config = {**GOOD_CONFIG, "comment": " " * (4 << 20)}
    (inputs / "big-config.tar").write_bytes(docker_config_archive(config=padded_config))
    return {
        "env-file-dev-zero": (("run", "--rm", "--env-file", "/dev/zero", BASE, "true"),
                              "--env-file /dev/zero:1: line larger than the limit of 64 KiB"),
        "env-file-over-16-mib": (("run", "--rm", "--env-file", f"{inputs}/big.env", BASE, "true"),
                                "big.env: input larger than the limit of 16 MiB"),
        "env-file-long-line": (("run", "--rm", "--env-file", f"{inputs}/long-line.env", BASE, "true"),
                               "long-line.env:1: line larger than the limit of 64 KiB"),
        "dockerfile-dev-zero": (("build", "-f", "/dev/zero", f"{inputs}/ctx"),
                                "/dev/zero: input larger than the limit of 16 MiB"),
        "dockerignore-dev-zero": (("build", f"{inputs}/ctx-zero-ignore"),
                                  ".dockerignore: input larger than the limit of 16 MiB"),
        "load-manifest-over-1-mib": (("load", "-i", f"{inputs}/big-manifest.tar"),
                                     "manifest.json: input larger than the limit of 1 MiB"),
        "load-config-over-4-mib": (("load", "-i", f"{inputs}/big-config.tar"),
                                   "c.json: input larger than the limit of 4 MiB"),
    }


OVERSIZED = ["env-file-dev-zero", "env-file-over-16-mib", "env-file-long-line", "dockerfile-dev-zero",
             "dockerignore-dev-zero", "load-manifest-over-1-mib", "load-config-over-4-mib"]


@pytest.mark.parametrize("name", OVERSIZED)
def test_oversized_input_is_refused_naming_the_limit(name: str, store: Store) -> None:
    (store.inputs / name).mkdir()
    argv, expect = oversized_inputs(store.inputs / name)[name]
    before = tree(store.root)
    # 1 GiB of address space: before the limits these grew until the OOM killer came.
    result = store.run(*argv, limit_memory=GiB)
    assert_refused(store, result, expect, before)


def test_image_with_huge_passwd_costs_one_line_of_memory(store: Store) -> None:
    """A sparse 256 MiB /etc/passwd used to be read whole (and decoded, and split) by ``run``."""
    context = store.inputs / "huge-passwd"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM lamina/busybox\nRUN rm /etc/passwd && dd if=/dev/zero of=/etc/passwd bs=1 count=0 seek=268435456 2>/dev/null\n")
    assert store.run("build", "-t", "huge/passwd", str(context)).returncode == 0
    try:
        before = tree(store.root)
        result, peak_kib = peak_rss_kib(store, "run", "--rm", "huge/passwd", "true")
        assert_refused(store, result, "the image's /etc/passwd:1: line larger than the limit of 64 KiB", before)
        assert peak_kib < 150 << 10, f"a lamina process reached {peak_kib >> 10} MiB"
    finally:
        store.run("rmi", "huge/passwd")


# --- item 5: decompression bombs in load ---------------------------------------------------------


def write_bomb(path: Path, kind: str, size: int) -> None:
    """A docker-archive, compressed with ``kind``, whose one layer is ``size`` bytes of zeros."""
    import tarfile

    import zstandard

    with open(path, "wb") as raw:
        out = (gzip_writer(raw) if kind == "gzip"
               else zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False))
        with out, tarfile.open(fileobj=out, mode="w|") as tar:
            info = tarfile.TarInfo("l/layer.tar")
            info.size = size
            tar.addfile(info, ZeroReader(size))


def gzip_writer(raw: io.BufferedWriter) -> gzip.GzipFile:
    return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)


class ZeroReader:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


SMALL_STORE = r"""
import json, os, subprocess, sys, time
mnt, bomb, verb = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt], check=True)
root = os.path.join(mnt, "root")
def lamina(*args):
    return subprocess.run([sys.executable, "-m", "lamina", "--root", root, *args], capture_output=True, text=True)
def files():
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, names in os.walk(root)
                  for n in dirs + names if n not in ("lock", "tags.lock") and "build-cache" not in d)
def free():
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize
assert lamina("images").returncode == 0
before, free_before = files(), free()
if verb == "load":
    result = lamina("load", "-i", bomb)
elif verb == "import":
    result = lamina("import", bomb, "evil/x")
else:
    result = lamina("build", "-t", "evil/x", bomb)  # a build context
# The kernel may release an unlinked file's pages a moment after the process that closed it exits.
deadline = time.monotonic() + 5
while free() < free_before - (1 << 20) and time.monotonic() < deadline:
    time.sleep(0.02)
print(json.dumps({"code": result.returncode, "stderr": result.stderr, "before": before, "after": files(),
                  "free_before": free_before, "free_after": free()}))
"""


@pytest.mark.parametrize(("verb", "kind"), [("load", "gzip"), ("load", "zstd"), ("import", "zstd")])
def test_decompression_bomb_on_a_small_filesystem(verb: str, kind: str, tmp_path: Path) -> None:
    """300 MiB of zeros in ~1 MiB of archive, loaded (or imported) into a store on a 64 MiB tmpfs:
    refused before (gzip records its size) or during (zstd) decompression, naming the filesystem,
    with nothing left behind and the space given back."""
    bomb = tmp_path / f"bomb.tar.{kind}"
    write_bomb(bomb, kind, 300 << 20)
    assert bomb.stat().st_size < 2 << 20
    mnt = tmp_path / "small"
    mnt.mkdir()
    # A private mount namespace: the tmpfs disappears with the process whatever happens.
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", SMALL_STORE,
                          str(mnt), str(bomb), verb], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "Traceback" not in report["stderr"], report["stderr"]
    assert report["code"] == docker_error_code([verb]), report
    doing = "loading" if verb == "load" else "importing"
    assert report["stderr"] == f"lamina: error: no space left on {mnt} while {doing} {bomb}\n"
    assert report["after"] == report["before"]
    assert report["free_after"] >= report["free_before"] - (1 << 20)


def test_build_on_a_full_filesystem_names_the_line(tmp_path: Path) -> None:
    """COPY of a 100 MiB file into a store on a 64 MiB tmpfs: Dockerfile:N and the filesystem."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\nCOPY small /small\nCOPY big /big\n")
    (context / "small").write_text("x")
    with open(context / "big", "wb") as f:
        f.truncate(100 << 20)
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", SMALL_STORE,
                          str(mnt), str(context), "build"], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "Traceback" not in report["stderr"] and report["code"] == 1, report
    assert report["stderr"].splitlines()[-1] == (
        f"lamina: error: Dockerfile:3: no space left on {mnt}: 'COPY big /big'")
    # Only the build cache may keep the step that succeeded (as docker); its layer is not an image.
    assert [f for f in report["after"] if f not in report["before"]
            and not f.startswith(("layers/", "blobs/sha256/", "build-cache"))] == []
    assert report["free_after"] >= report["free_before"] - (1 << 20)


def test_decompression_is_capped_by_the_layer_limit(store: Store) -> None:
    bomb = store.inputs / "capped.tar.zst"
    write_bomb(bomb, "zstd", 100 << 20)
    before = tree(store.root)
    result = store.run("load", "-i", str(bomb), env={**os.environ, "LAMINA_MAX_LAYER_BYTES": str(32 << 20)})
    assert_refused(store, result, f"{bomb}: decompresses to more than 32 MiB", before)


# --- item 7: build errors name Dockerfile:N; nothing traces back ---------------------------------


def deep_substitution(depth: int) -> str:
    return "${a:-" * depth + "v" + "}" * depth


BAD_DOCKERFILES: dict[str, tuple[str, str]] = {
    "run-in-scratch": ("FROM scratch\nRUN true\n", "Dockerfile:2: /bin/sh: no such file or directory"),
    "mount-outside-context": ("FROM lamina/busybox\nRUN --mount=type=bind,source=../../etc,target=/x ls /x\n",
                              "Dockerfile:2: forbidden path outside the build context"),
    "unknown-user": ("FROM lamina/busybox\nUSER nosuch\nRUN true\n",
                     "Dockerfile:3: unable to find user nosuch"),
    "copy-from-itself": ("FROM lamina/busybox AS a\nCOPY --from=a /bin/sh /x\n",
                         "Dockerfile:2: circular dependency detected on stage: a"),
    "copy-from-itself-by-index": ("FROM lamina/busybox\nCOPY --from=0 /bin/sh /x\n",
                                  "Dockerfile:2: circular dependency detected on stage: 0"),
    "substitution-1000-deep": (f"FROM lamina/busybox\nENV X={deep_substitution(1000)}\n",
                               "Dockerfile:2: substitutions nested more than 100 deep"),
    # docker's rule for an ID prefix: at least 4 hex digits ("{id1}" is the base image's first one).
    "from-one-hex-digit": ("FROM {id1}\n", "Dockerfile:1: base image '{id1}' is not in the store"),
}


@pytest.mark.parametrize("name", list(BAD_DOCKERFILES))
def test_build_error_names_the_dockerfile_line(name: str, store: Store) -> None:
    base_id = store.run("inspect", "--format", "{{.Id}}", BASE).stdout.strip().removeprefix("sha256:")
    text, expect = (part.replace("{id1}", base_id[0]) for part in BAD_DOCKERFILES[name])
    context = store.inputs / f"build-{name}"
    context.mkdir()
    (context / "Dockerfile").write_text(text)
    before = tree(store.root)
    result = store.run("build", "-t", "bad/build", str(context))
    assert_refused(store, result, expect, before)


def test_nesting_within_the_limit_still_builds(store: Store) -> None:
    context = store.inputs / "build-deep-ok"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM lamina/busybox\nENV X={deep_substitution(100)}\nRUN test \"$X\" = v\n")
    assert store.run("build", str(context)).returncode == 0


def test_four_hex_digits_name_an_image(store: Store) -> None:
    base_id = store.run("inspect", "--format", "{{.Id}}", BASE).stdout.strip()
    found = store.run("inspect", "--format", "{{.Id}}", base_id.removeprefix("sha256:")[:4])
    assert found.returncode == 0 and found.stdout.strip() == base_id, found.stderr


def test_unreadable_context_file_names_the_line(unpriv: object, tmp_path: Path) -> None:
    user = unpriv
    context: Path = user.workdir / "ctx"  # type: ignore[attr-defined]
    context.mkdir()
    (context / "Dockerfile").write_text("FROM lamina/busybox\n\nCOPY secret /secret\n")
    (context / "secret").write_text("x")
    user.chown_tree(context)  # type: ignore[attr-defined]
    (context / "secret").chmod(0)
    result = user.lamina("build", str(context))  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"lamina: error: Dockerfile:3: Permission denied: {context}/secret: 'COPY secret /secret'")


# --- item 7: command-line values that used to be accepted silently -------------------------------


BAD_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "logs-tail-not-a-number": (("logs", "-n", "abc", "keeper"), "--tail 'abc'"),
    "ps-unclosed-action": (("ps", "--format", "{{"), "failed to parse template: template: :1: unclosed action"),
    "ps-unclosed-action-all": (("ps", "-a", "--format", "{{.Names}} {{"), "unclosed action"),
    "ps-range-without-end": (("ps", "-a", "--format", "{{range .Names}}"), "template: :1: unexpected EOF"),
    "images-unclosed-action": (("images", "--format", "{{.ID"), "unclosed action"),
}


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_flag_value_is_refused(name: str, store: Store) -> None:
    argv, expect = BAD_FLAGS[name]
    before = tree(store.root)
    assert_refused(store, store.run(*argv), expect, before)


def test_empty_root_is_refused(store: Store) -> None:
    result = subprocess.run([sys.executable, "-m", "lamina", "--root", "", "images"], capture_output=True,
                            text=True, timeout=60, cwd=REPO_ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (125, "", "lamina: error: --root: empty path\n")


def test_logs_tail_all_and_negative_mean_everything(store: Store) -> None:
    assert store.run("run", "--name", "counter", BASE, "seq", "1", "5").returncode == 0
    try:
        everything = "".join(f"{n}\n" for n in range(1, 6))
        for tail in ("all", "-1"):
            result = store.run("logs", "-n", tail, "counter")
            assert (result.returncode, result.stdout) == (0, everything), result.stderr
        last_two = store.run("logs", "-n", "2", "counter")  # the same log, cut: the logs are there
        assert (last_two.returncode, last_two.stdout) == (0, "4\n5\n"), last_two.stderr
    finally:
        store.run("rm", "-f", "counter")


# --- item 7: registries that trickle, and indexes inside indexes ---------------------------------


def test_registry_that_trickles_is_abandoned(tmp_path: Path, lamina_cmd: Lamina) -> None:
    """One byte every 0.5 s never trips the socket timeout; the low-speed limit (here 100 bytes/s
    over 2 s, as curl's --speed-limit 100 --speed-time 2) ends the pull in one line."""
    import time

    from registry_server import FakeRegistry, layer_blob

    fake = FakeRegistry(trickle=0.5)
    fake.add_image("slow/img", "latest", [layer_blob({"f": b"x" * 4096})])
    root = tmp_path / "lamina-root"
    assert lamina_cmd("images", root=root).returncode == 0
    before = tree(root)
    with fake.serve():
        started = time.monotonic()
        result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/slow/img", check=False,
                            env={"LAMINA_SPEED_LIMIT": "100", "LAMINA_SPEED_TIME": "2"})
        elapsed = time.monotonic() - started
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "slower than 100 bytes/s for 2 s, aborted" in lines[0], result.stderr
    assert elapsed < 30
    assert tree(root) == before


def test_pull_follows_an_index_inside_an_index(tmp_path: Path, lamina_cmd: Lamina) -> None:
    from registry_server import FakeRegistry, layer_blob, pulled_id
    from lamina.store.registry_manifest import OCI_INDEX, OCI_MANIFEST, host_platform

    fake = FakeRegistry()
    config, manifest = fake.add_image("nested/img", "inner", [layer_blob({"f": b"nested"})])
    platform = {"os": "linux", "architecture": host_platform().architecture}
    inner = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest), "platform": platform}]})
    inner_digest = fake.add_manifest("nested/img", None, OCI_INDEX, inner.encode())
    outer = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_INDEX, "digest": inner_digest, "size": len(inner), "platform": platform}]})
    fake.add_manifest("nested/img", "latest", OCI_INDEX, outer.encode())
    with fake.serve():
        result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/nested/img", check=False)
    assert result.returncode == 0, result.stderr
    assert pulled_id(lamina_cmd, result) == hashlib.sha256(config).hexdigest()


# --- CVE-2019-14271 class: no host process resolves users through the image's NSS ----------------

NSS_MODULE = r"""
#include <nss.h>
#include <pwd.h>
#include <grp.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void loaded(void) {
    static const char message[] = "LAMINA-TEST-NSS-LOADED\n";
    (void)!write(2, message, sizeof message - 1);
}

enum nss_status _nss_lamtest_getpwnam_r(const char *name, struct passwd *pw, char *buf, size_t len, int *err) {
    if (strcmp(name, "ghost") != 0) return NSS_STATUS_NOTFOUND;
    pw->pw_name = (char *)"ghost"; pw->pw_passwd = (char *)"x"; pw->pw_uid = 4242; pw->pw_gid = 4242;
    pw->pw_gecos = (char *)""; pw->pw_dir = (char *)"/"; pw->pw_shell = (char *)"/bin/sh";
    return NSS_STATUS_SUCCESS;
}

enum nss_status _nss_lamtest_getgrnam_r(const char *name, struct group *gr, char *buf, size_t len, int *err) {
    if (strcmp(name, "ghosts") != 0) return NSS_STATUS_NOTFOUND;
    static char *none[] = {0};
    gr->gr_name = (char *)"ghosts"; gr->gr_passwd = (char *)"x"; gr->gr_gid = 4343; gr->gr_mem = none;
    return NSS_STATUS_SUCCESS;
}
"""
NSS_MARK = "LAMINA-TEST-NSS-LOADED"
NSS_LIB_DIRS = ["lib", "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib",
                "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu"]


@pytest.fixture(scope="module")
def nss_trap_image(store: Store) -> Iterator[Path]:
    """An image whose nsswitch.conf sends user look-ups to its own libnss_lamtest.so.2, which says
    so on stderr when loaded and knows a user ``ghost`` (4242) that /etc/passwd does not; its
    /etc/passwd knows ``alice`` (1234)."""
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the NSS module the test plants in the image")
    context = store.inputs / "nss-trap"
    context.mkdir()
    (context / "nss.c").write_text(NSS_MODULE)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(context / "libnss_lamtest.so.2"),
                    str(context / "nss.c")], check=True, capture_output=True)
    (context / "nsswitch.conf").write_text("passwd: lamtest files\ngroup: lamtest files\nhosts: files\n")
    (context / "owned").write_text("x")
    copies = "".join(f"COPY libnss_lamtest.so.2 /{d}/\n" for d in NSS_LIB_DIRS)
    (context / "Dockerfile").write_text(
        "FROM lamina/busybox\nCOPY nsswitch.conf /etc/nsswitch.conf\n" + copies +
        "RUN echo 'alice:x:1234:1234::/home/alice:/bin/sh' >> /etc/passwd && echo 'team:x:1300:alice' >> /etc/group\n")
    result = store.run("build", "-t", "nss/trap", str(context))
    assert result.returncode == 0 and NSS_MARK not in result.stderr, result.stderr
    yield context
    store.run("rmi", "-f", "nss/trap")


def test_the_nss_trap_springs_for_a_host_lookup(nss_trap_image: Path) -> None:
    """The control: a host process whose NSS reads the image's nsswitch.conf loads the image's module
    and believes in ``ghost`` (what docker cp did, CVE-2019-14271)."""
    script = (f"mount --bind {nss_trap_image}/nsswitch.conf /etc/nsswitch.conf && "
              f"LD_LIBRARY_PATH={nss_trap_image} {sys.executable} -c "
              "'import pwd; print(pwd.getpwnam(\"ghost\").pw_uid)'")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "4242\n" and NSS_MARK in result.stderr, result


def test_users_come_from_the_image_files_not_its_nss(store: Store, nss_trap_image: Path) -> None:
    status = store.run("run", "--rm", "-u", "alice", "nss/trap", "grep", "-E", "^(Uid|Gid|Groups):",
                       "/proc/self/status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.split() == ["Uid:", *["1234"] * 4, "Gid:", *["1234"] * 4, "Groups:", "1300"]
    assert NSS_MARK not in status.stderr
    before = tree(store.root)
    ghost = store.run("run", "--rm", "-u", "ghost", "nss/trap", "true")
    assert NSS_MARK not in ghost.stderr
    assert_refused(store, ghost, "unable to find user ghost", before)
    group = store.run("run", "--rm", "-u", "alice:ghosts", "nss/trap", "true")
    assert NSS_MARK not in group.stderr
    assert_refused(store, group, "unable to find group ghosts", before)


def test_exec_and_build_resolve_users_from_the_image_files(store: Store, nss_trap_image: Path) -> None:
    assert store.run("run", "-d", "--name", "nss-trap", "nss/trap", "sleep", "60").returncode == 0
    try:
        alice = store.run("exec", "-u", "alice", "nss-trap", "grep", "^Uid:", "/proc/self/status")
        assert alice.returncode == 0 and alice.stdout.split()[1:] == ["1234"] * 4, alice
        ghost = store.run("exec", "-u", "ghost", "nss-trap", "true")
        assert ghost.returncode != 0 and "unable to find user ghost" in ghost.stderr
        assert NSS_MARK not in alice.stderr + ghost.stderr
    finally:
        store.run("rm", "-f", "nss-trap")
    context = store.inputs / "nss-build"
    context.mkdir()
    (context / "f").write_text("x")
    (context / "Dockerfile").write_text(
        "FROM nss/trap\nCOPY --chown=alice:team f /f\nUSER alice\nWORKDIR /made-by-alice\n"
        "RUN stat -c '%u:%g' /f /made-by-alice > /tmp/owners && grep ^Uid: /proc/self/status >> /tmp/owners\n"
        "USER root\nCMD cat /tmp/owners\n")
    built = store.run("build", "-t", "nss/built", str(context))
    assert built.returncode == 0 and NSS_MARK not in built.stderr, built.stderr
    try:
        owners = store.run("run", "--rm", "nss/built")
        assert owners.stdout.split() == ["1234:1300", "1234:1234", "Uid:", *["1234"] * 4], owners
        before = tree(store.root)
        (context / "Dockerfile").write_text("FROM nss/trap\nCOPY --chown=ghost f /f\n")
        refused = store.run("build", str(context))
        assert NSS_MARK not in refused.stderr
        assert_refused(store, refused, "Dockerfile:2: --chown=ghost: no user named 'ghost'", before)
    finally:
        store.run("rmi", "-f", "nss/built")


def good_config_and_manifest() -> tuple[bytes, bytes]:
    """GOOD_CONFIG and an OCI image manifest of it and LAYER."""
    config = json.dumps(GOOD_CONFIG).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha256(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": sha256(LAYER), "size": len(LAYER)}]}).encode()
    return config, manifest


def test_load_follows_this_platforms_index_inside_an_index(store: Store) -> None:
    """index.json -> an index for this platform -> the image manifest (as BuildKit writes them)."""
    from lamina.store.registry_manifest import OCI_INDEX, OCI_MANIFEST, host_platform

    platform = {"os": "linux", "architecture": host_platform().architecture}
    config, manifest = good_config_and_manifest()
    inner = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest), "platform": platform}]}).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_INDEX, "digest": sha256(inner), "size": len(inner), "platform": platform,
         "annotations": {"io.containerd.image.name": "nested/load:latest"}}]}
    path = store.inputs / "nested-index.tar"
    path.write_bytes(oci_archive(index, [LAYER, config, manifest, inner]))
    result = store.run("load", "-i", str(path))
    try:
        assert result.returncode == 0 and "Loaded image: nested/load:latest" in result.stdout, result.stderr
    finally:
        store.run("rmi", "nested/load:latest")


def test_load_ignores_index_entries_of_unknown_media_types(store: Store) -> None:
    """The image-index spec: "An encountered mediaType that is unknown to the implementation MUST be
    ignored" -- an entry for this platform that is not an image (an artifact, say) is passed over."""
    from lamina.store.registry_manifest import OCI_INDEX, OCI_MANIFEST, host_platform

    platform = {"os": "linux", "architecture": host_platform().architecture}
    config, manifest = good_config_and_manifest()
    artifact = b"not an image"
    inner = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": "application/vnd.example.artifact", "digest": sha256(artifact), "size": len(artifact),
         "platform": platform},
        {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest), "platform": platform}]}).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_INDEX, "digest": sha256(inner), "size": len(inner),
         "annotations": {"io.containerd.image.name": "artifact/load:latest"}}]}
    path = store.inputs / "artifact-index.tar"
    path.write_bytes(oci_archive(index, [LAYER, config, manifest, inner, artifact]))
    result = store.run("load", "-i", str(path))
    try:
        assert result.returncode == 0 and "Loaded image: artifact/load:latest" in result.stdout, result.stderr
    finally:
        store.run("rmi", "artifact/load:latest")


def test_pull_takes_an_index_entry_without_a_platform(tmp_path: Path, lamina_cmd: Lamina) -> None:
    """The image-index spec: platform "SHOULD be present if its target is platform-specific": an
    entry without one is for any platform (registries and archives choose alike)."""
    from registry_server import FakeRegistry, layer_blob, pulled_id
    from lamina.store.registry_manifest import OCI_INDEX, OCI_MANIFEST

    fake = FakeRegistry()
    config, manifest = fake.add_image("anyplatform/img", "inner", [layer_blob({"f": b"any"})])
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest)}]})
    fake.add_manifest("anyplatform/img", "latest", OCI_INDEX, index.encode())
    with fake.serve():
        result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/anyplatform/img", check=False)
    assert result.returncode == 0, result.stderr
    assert pulled_id(lamina_cmd, result) == hashlib.sha256(config).hexdigest()


def test_add_from_a_trickling_server_is_abandoned(store: Store) -> None:
    import http.server
    import threading
    import time

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        context = store.inputs / "add-trickle"
        context.mkdir()
        (context / "Dockerfile").write_text(
            f"FROM lamina/busybox\nADD http://127.0.0.1:{server.server_address[1]}/f /f\n")
        before = tree(store.root)
        started = time.monotonic()
        result = store.run("build", str(context),
                           env={**os.environ, "LAMINA_SPEED_LIMIT": "100", "LAMINA_SPEED_TIME": "2"})
        assert time.monotonic() - started < 30
        assert_refused(store, result, "Dockerfile:2: ADD failed: downloading http://127.0.0.1:", before)
        assert "slower than 100 bytes/s for 2 s" in result.stderr
    finally:
        server.shutdown()


def test_refusals_as_an_unprivileged_user(unpriv: object) -> None:
    """The same limits and refusals for a user without root (with and without subordinate ids)."""
    user = unpriv
    work: Path = user.workdir  # type: ignore[attr-defined]
    (work / "malformed.tar").write_bytes(docker_config_archive(config={**GOOD_CONFIG, "rootfs": "x"}))
    write_bomb(work / "bomb.tar.zst", "zstd", 64 << 20)
    (work / "ctx").mkdir()
    (work / "ctx" / "Dockerfile").write_text("FROM scratch\nRUN true\n")
    user.chown_tree(work)  # type: ignore[attr-defined]
    cases = [
        (("run", "--rm", "--env-file", "/dev/zero", BASE, "true"), "--env-file /dev/zero:1: line larger"),
        (("build", "-f", "/dev/zero", str(work / "ctx")), "/dev/zero: input larger than the limit of 16 MiB"),
        (("build", str(work / "ctx")), "Dockerfile:2: /bin/sh: no such file or directory"),
        (("load", "-i", str(work / "malformed.tar")), "c.json: 'rootfs' is a string, not an object"),
        (("load", "-i", str(work / "bomb.tar.zst")), "bomb.tar.zst: decompresses to more than 16 MiB"),
        (("ps", "--format", "{{"), "unclosed action"),
    ]
    for argv, expect in cases:
        result = user.lamina(*argv, env={"LAMINA_MAX_LAYER_BYTES": str(16 << 20)})  # type: ignore[attr-defined]
        assert "Traceback" not in result.stderr and result.returncode == docker_error_code(argv), (argv, result.stderr)
        lines = result.stderr.splitlines()
        assert lines[-1].startswith("lamina: error: ") and expect in lines[-1], (argv, result.stderr)
        assert len([line for line in lines if line.startswith("lamina: error: ")]) == 1
    check = user.lamina("system", "check")  # type: ignore[attr-defined]
    assert check.returncode == 0, check.stderr
