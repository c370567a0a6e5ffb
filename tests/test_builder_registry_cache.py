"""``build --cache-to/--cache-from``: a build cache shared by two machines through a registry.

Two stores stand for two CI runners, each with its own checkout of the context (other paths, other
modification times, other directory sizes); Debian's Distribution registry on 127.0.0.1 is the
shared cache, as BuildKit's ``type=registry`` cache would use it. The outside references are the
registry itself (it must accept and serve the cache as an OCI manifest) and docker's documented
behaviour: every step of a rebuild from a full cache is CACHED and gives the same image, a changed
COPY source re-runs that step and the ones after it, and a cache ref that is missing or unreachable
is one warning while the build goes on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import RunningRegistry, bcrypt_hash, run_registry

from harness import REPO_ROOT, UnprivilegedUser

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")]

SECRET = "s3cr3t-7d1c9e-never-exported"


class Machine:
    """One store and one checkout: a CI runner."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = env or {}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "lamina", "--root", str(self.root), *args],
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        if check and result.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def image_id(self, ref: str) -> str:
        from lamina.store import Store

        return Store.open(self.root).resolve_image(ref).id


def step_results(output: str) -> dict[str, str]:
    """``STEP n/N: TEXT`` -> ``CACHED`` or the ID it printed, for every step but FROM."""
    results: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if m := re.match(r"STEP \d+/\d+: (.*)", line):
            current = None if m.group(1).startswith("FROM") else m.group(1)
        elif current is not None and line.startswith("--> "):
            results[current] = line[4:]
            current = None
    return results


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with run_registry(tmp_path_factory.mktemp("cache-registry")) as running:
        yield running


DOCKERFILE = """\
FROM lamina/busybox
ENV APP=/srv/app
WORKDIR $APP
COPY config.txt ./
COPY lib/ lib/
RUN --mount=type=secret,id=tok --mount=type=secret,id=tok,env=TOKEN \
    test "$TOKEN" = "$(cat /run/secrets/tok)" && grep -q never-exported /run/secrets/tok && echo ok > checked
COPY main.txt ./
RUN cat config.txt lib/* main.txt > all.txt
CMD ["cat", "all.txt"]
"""


def checkout(path: Path, mtime: int) -> Path:
    """The same sources as another machine would check them out: other times, other inode numbers,
    and a directory whose size on disk differs (ext4 does not shrink a directory)."""
    (path / "lib").mkdir(parents=True)
    (path / "Dockerfile").write_text(DOCKERFILE)
    (path / "config.txt").write_text("config\n")
    (path / "main.txt").write_text("main\n")
    (path / "lib" / "a.txt").write_text("lib a\n")
    if mtime % 2:
        for n in range(300):
            (path / "lib" / f"tmp-{n:04d}-{'x' * 40}").write_text("")
        for n in range(300):
            (path / "lib" / f"tmp-{n:04d}-{'x' * 40}").unlink()
    for item in [path, *path.rglob("*")]:
        os.utime(item, (mtime, mtime))
    return path


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(SECRET)
    return path


def test_second_machine_builds_from_the_registry_cache(registry: RunningRegistry, tmp_path: Path) -> None:
    ref = f"{registry.address}/ci/app:buildcache"
    secret = f"id=tok,src={secret_file(tmp_path)}"
    first, second = Machine(tmp_path / "runner-1"), Machine(tmp_path / "runner-2")
    ctx1 = checkout(tmp_path / "checkout-1", 1_000_000_001)
    ctx2 = checkout(tmp_path / "checkout-2", 1_700_000_000)
    assert (ctx1 / "lib").stat().st_size != (ctx2 / "lib").stat().st_size

    cold = first("build", "--secret", secret, "--cache-to", f"type=registry,ref={ref}", "-t", "app", str(ctx1))
    assert "CACHED" not in cold.stdout
    assert f"Exporting cache to {ref}" in cold.stdout
    assert_layers_go_out_gzipped(registry, ref, first)

    warm = second("build", "--secret", secret, "--cache-from", f"type=registry,ref={ref}", "-t", "app", str(ctx2))
    results = step_results(warm.stdout)
    assert len(results) == 8 and set(results.values()) == {"CACHED"}, warm.stdout
    assert second.image_id("app") == first.image_id("app")
    assert second("run", "--rm", "app").stdout == "config\nlib a\nmain\n"

    # The secret is in no blob the registry holds, compressed or not, nor in either local cache.
    for blob in (registry.storage / "docker/registry/v2/blobs").rglob("data"):
        data = blob.read_bytes()
        assert SECRET.encode() not in data
        if data[:2] == b"\x1f\x8b":
            assert SECRET.encode() not in gzip.decompress(data)
    for machine in (first, second):
        for path in (machine.root / "build-cache").rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes()

    # A changed COPY source: that step and the ones after it run, the ones before stay CACHED.
    (ctx2 / "lib" / "a.txt").write_text("lib a, changed\n")
    third = Machine(tmp_path / "runner-3")
    changed = third("build", "--secret", secret, "--cache-from", ref, "-t", "app", str(ctx2))
    results = step_results(changed.stdout)
    steps = list(results)
    first_run = steps.index("COPY lib/ lib/")
    assert all(results[s] == "CACHED" for s in steps[:first_run]), changed.stdout
    assert all(results[s] != "CACHED" for s in steps[first_run:]), changed.stdout
    assert third("run", "--rm", "app").stdout == "config\nlib a, changed\nmain\n"


def assert_layers_go_out_gzipped(registry: RunningRegistry, ref: str, machine: Machine) -> None:
    """The cache's layers are the gzip blobs a push sends (smaller than the plain tars the store
    keeps), each annotated with the diff_id its records and keys name."""
    from lamina.store import Reference, Store
    from lamina.store.outbound import cached_gzip
    from lamina.store.registry import RegistryClient

    parsed = Reference.parse(ref)
    with RegistryClient(registry.address, tls_verify=False) as client:
        manifest = json.loads(client.get_manifest(parsed.repository, parsed.tag or "latest").data)
    store = Store.open(machine.root)
    assert manifest["layers"]
    for layer in manifest["layers"]:
        diff_id = layer["annotations"]["containerd.io/uncompressed"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert layer["digest"] == cached_gzip(store, diff_id)  # the blob a push of the image sends
        assert layer["size"] < store.blobs.size(diff_id)
        blob = registry.storage / "docker/registry/v2/blobs/sha256" / layer["digest"][7:9] / layer["digest"][7:] / "data"
        assert f"sha256:{hashlib.sha256(gzip.decompress(blob.read_bytes())).hexdigest()}" == diff_id


def test_missing_or_unreachable_cache_is_one_warning(registry: RunningRegistry, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo built > /built\n")
    machine = Machine(tmp_path / "runner")
    unused_port = f"127.0.0.1:{_closed_port()}"
    result = machine("build", "--cache-from", f"type=registry,ref={registry.address}/ci/nosuch:cache",
                     "--cache-from", f"{unused_port}/ci/app:cache", str(ctx))
    warnings = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "Warning" in line]
    assert len(warnings) == 2, result.stdout + result.stderr
    assert "nosuch" in warnings[0] and "building without it" in warnings[0]
    assert unused_port in warnings[1] and "building without it" in warnings[1]
    assert "Traceback" not in result.stderr
    assert set(step_results(result.stdout).values()) != {"CACHED"}


def _closed_port() -> int:
    from registry_server import free_port

    return free_port()


MULTISTAGE = """\
FROM lamina/busybox AS tools
RUN echo tool > /tool
FROM lamina/busybox
COPY --from=tools /tool /tool
RUN cat /tool > /used
"""


@pytest.mark.parametrize("mode", ["min", "max"])
def test_mode_min_exports_the_final_stage_max_every_stage(registry: RunningRegistry, tmp_path: Path,
                                                          mode: str) -> None:
    ref = f"{registry.address}/ci/multi:{mode}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MULTISTAGE)
    first, second = Machine(tmp_path / "a"), Machine(tmp_path / "b")
    out = first("build", "--cache-to", f"type=registry,ref={ref},mode={mode}", "-t", "multi", str(ctx)).stdout
    assert f"({2 if mode == 'min' else 3} steps, mode={mode})" in out
    results = step_results(second("build", "--cache-from", ref, "-t", "multi", str(ctx)).stdout)
    if mode == "max":
        assert set(results.values()) == {"CACHED"}
        assert second.image_id("multi") == first.image_id("multi")
    else:
        # The tools stage runs again; what COPY --from reads is keyed by what it made then.
        assert results["RUN echo tool > /tool"] != "CACHED"


def test_concurrent_exports_leave_a_valid_cache(registry: RunningRegistry, tmp_path: Path) -> None:
    """Two builders export to one ref at the same moment, many times: after each round the ref names
    the whole cache of one of them, which a third builder uses in full."""
    from builder.cache_config import CacheRecord
    from builder.registry_cache import CacheTarget, export
    from lamina.store import Store
    from lamina.store.registry import RegistryClient

    ref = f"{registry.address}/ci/shared:cache"
    builders = []
    for name in ("x", "y"):
        ctx = tmp_path / f"ctx-{name}"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"FROM lamina/busybox\nRUN echo {name} > /{name}\nRUN echo 2 >> /{name}\n")
        machine = Machine(tmp_path / f"store-{name}")
        machine("build", "-t", name, str(ctx))
        store = Store.open(machine.root)
        records = []
        for path in sorted((machine.root / "build-cache" / "steps").glob("*/*.json")):
            entry = json.loads(path.read_text())
            records.append(CacheRecord.from_entry(path.stem, entry, store.blobs.size(entry["layer"]["digest"])))
        builders.append((ctx, store, records))

    manifests = set()
    errors: list[BaseException] = []

    def run(barrier: threading.Barrier, store: Store, records: list[CacheRecord]) -> None:
        try:
            barrier.wait()
            manifests.add(export(store, CacheTarget("registry", ref), records))
        except BaseException as e:
            errors.append(e)

    for _round in range(4):
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=run, args=(barrier, store, records)) for _ctx, store, records in builders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        with RegistryClient(registry.address, tls_verify=False) as client:
            current = client.get_manifest("ci/shared", "cache")
            assert current.digest in manifests
            for desc in [current.image().config, *current.image().layers]:
                assert client.has_blob("ci/shared", desc.digest)
    assert len(manifests) == 2

    third = Machine(tmp_path / "store-z")
    outcomes = []
    for ctx, _store, _records in builders:
        outcomes.append(set(step_results(third("build", "--cache-from", ref, str(ctx)).stdout).values()))
    assert {"CACHED"} in outcomes


def test_inline_cache_of_a_pushed_image(registry: RunningRegistry, tmp_path: Path) -> None:
    """docker's older ``--cache-from IMAGE``: the image carries the cache (BUILDKIT_INLINE_CACHE)."""
    image = f"{registry.address}/ci/inline:1"
    first, second = Machine(tmp_path / "a"), Machine(tmp_path / "b")
    ctx1 = checkout(tmp_path / "checkout-1", 1_000_000_001)
    ctx2 = checkout(tmp_path / "checkout-2", 1_700_000_000)
    secret = f"id=tok,src={secret_file(tmp_path)}"
    first("build", "--secret", secret, "--build-arg", "BUILDKIT_INLINE_CACHE=1", "-t", image, str(ctx1))
    first("push", image)
    warm = second("build", "--secret", secret, "--cache-to", "type=inline", "--cache-from", image, "-t", "app",
                  str(ctx2))
    assert set(step_results(warm.stdout).values()) == {"CACHED"}, warm.stdout
    assert "Warning" not in warm.stdout
    assert second.image_id("app") == first.image_id(image)

    # An image built without inline metadata: one warning, and the build goes on.
    first("build", "-t", f"{registry.address}/ci/plain:1", str(ctx1), "--secret", secret)
    first("push", f"{registry.address}/ci/plain:1")
    third = Machine(tmp_path / "c")
    out = third("build", "--secret", secret, "--cache-from", f"{registry.address}/ci/plain:1", str(ctx2)).stdout
    assert "no build cache metadata" in out and "CACHED" not in out


def test_cache_behind_basic_auth(tmp_path: Path) -> None:
    password = "cache-pass"
    if bcrypt_hash(password) is None:
        pytest.skip("no bcrypt for an htpasswd file")
    with run_registry(tmp_path / "auth-registry", htpasswd={"ci": password}) as registry:
        ref = f"{registry.address}/ci/app:cache"
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo auth > /auth\n")
        auth = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
        first = Machine(tmp_path / "a", auth)
        first("login", "-u", "ci", "-p", password, registry.address)
        first("build", "--cache-to", f"type=registry,ref={ref}", str(ctx))
        anonymous = Machine(tmp_path / "b", {"REGISTRY_AUTH_FILE": str(tmp_path / "none.json")})
        out = anonymous("build", "--cache-from", ref, str(ctx)).stdout
        assert "[Warning] --cache-from" in out and "CACHED" not in out
        logged_in = Machine(tmp_path / "c", auth)
        assert set(step_results(logged_in("build", "--cache-from", ref, str(ctx)).stdout).values()) == {"CACHED"}


def test_bad_cache_options_are_one_line(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\n")
    machine = Machine(tmp_path / "a")
    for flag, value, words in [("--cache-to", "type=local,dest=/tmp/x", "unsupported cache type"),
                               ("--cache-to", "type=registry", "ref= is required"),
                               ("--cache-to", "type=registry,ref=r:5000/a:b,mode=all", "mode must be min or max"),
                               ("--cache-from", "type=gha", "unsupported cache type"),
                               ("--cache-from", "type=registry,ref=r:5000/app@sha256:xyz", "invalid reference")]:
        result = machine("build", flag, value, str(ctx), check=False)
        assert result.returncode != 0
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (machine.root / "images").exists() or not any((machine.root / "images").iterdir())


@pytest.mark.unprivileged
def test_registry_cache_unprivileged(unpriv: UnprivilegedUser, registry: RunningRegistry) -> None:
    ref = f"{registry.address}/ci/rootless:cache"
    ctx = unpriv.workdir / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nCOPY f /f\nRUN cat /f > /g\n")
    (ctx / "f").write_text("rootless\n")
    unpriv.chown_tree(unpriv.workdir)
    roots = [unpriv.workdir / "store-a", unpriv.workdir / "store-b"]
    unpriv.lamina("--root", str(roots[0]), "build", "--cache-to", f"type=registry,ref={ref}", "-t", "r", str(ctx),
                  check=True)
    out = unpriv.lamina("--root", str(roots[1]), "build", "--cache-from", ref, "-t", "r", str(ctx),
                        check=True).stdout
    assert set(step_results(out).values()) == {"CACHED"}, out


@pytest.mark.parametrize("lie", ["blob", "diff_id"])
def test_a_lying_cache_registry_costs_a_warning_not_the_build(registry: RunningRegistry, tmp_path: Path,
                                                               lie: str) -> None:
    """A cache whose layer blob is not what its digest says, or whose diff_id is wrong: the layer is
    refused before the store keeps it, one warning names it, and the step runs instead."""
    from registry_server import FakeRegistry, digest_of

    from lamina.store.registry import RegistryClient
    from lamina.store.registry_manifest import OCI_MANIFEST

    ref = f"{registry.address}/ci/honest:cache"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo a > /a\n")
    Machine(tmp_path / "a")("build", "--cache-to", f"type=registry,ref={ref}", str(ctx))
    fake = FakeRegistry()
    with RegistryClient(registry.address, tls_verify=False) as client:
        manifest = client.get_manifest("ci/honest", "cache")
        parsed = manifest.image()
        config = client.fetch_small_blob("ci/honest", parsed.config.digest, tmp_path)
        layers = {desc.digest: client.fetch_small_blob("ci/honest", desc.digest, tmp_path) for desc in parsed.layers}
    (layer_digest,) = layers
    for data in layers.values():
        fake.add_blob(data)
    document = json.loads(manifest.data)
    lying_bytes = b"\x1f\x8b" + layers[layer_digest][2:-1] + b"!"
    if lie == "blob":
        fake.blob_override[layer_digest] = lying_bytes
    else:
        metadata = json.loads(config)
        metadata["layers"][0]["annotations"]["diffID"] = "sha256:" + "0" * 64
        config = json.dumps(metadata).encode()
        document["config"].update(digest=digest_of(config), size=len(config))
    fake.add_blob(config)
    fake.add_manifest("ci/honest", "cache", OCI_MANIFEST, json.dumps(document).encode())

    second = Machine(tmp_path / "b")
    with fake.serve():
        result = second("build", "-t", "honest", "--cache-from", f"{fake.address}/ci/honest:cache", str(ctx))
    warnings = [line for line in result.stdout.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and layer_digest[7:19] in warnings[0] and "running the step" in warnings[0], result.stdout
    assert "CACHED" not in result.stdout and "Traceback" not in result.stderr
    assert not any(path.read_bytes() == lying_bytes for path in (second.root / "blobs").rglob("*") if path.is_file())
    assert not any((second.root / "tmp").iterdir())
    assert second("run", "--rm", "honest", "cat", "/a").stdout == "a\n"


def test_cache_from_a_local_image_needs_no_registry(tmp_path: Path) -> None:
    """``--cache-from IMAGE`` with the image in the store (pulled or loaded earlier): its inline cache
    is used as it is, with no registry to ask (docker's classic builder used local images)."""
    image = f"127.0.0.1:{_closed_port()}/ci/offline:1"
    first, second = Machine(tmp_path / "a"), Machine(tmp_path / "b")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nCOPY f /f\nRUN cat /f > /g\n")
    (ctx / "f").write_text("offline\n")
    first("build", "--cache-to", "type=inline", "-t", image, str(ctx))
    first("save", "-o", str(tmp_path / "image.tar"), image)
    second("load", "-i", str(tmp_path / "image.tar"))
    out = second("build", "--cache-from", image, "--cache-to", "type=inline", "-t", "copy", str(ctx)).stdout
    assert set(step_results(out).values()) == {"CACHED"} and "Warning" not in out, out
    assert second.image_id("copy") == first.image_id(image)


def test_registry_insecure_for_a_plain_http_cache(registry: RunningRegistry, tmp_path: Path) -> None:
    """A registry that is not on the loopback network needs HTTPS unless the ref says
    ``registry.insecure=true`` (BuildKit's option), as pull and push need ``--tls-verify=false``."""
    from registry_server import ForwardProxy

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo plain > /plain\n")
    with ForwardProxy().serve() as proxy:
        env = {"http_proxy": proxy.url, "https_proxy": proxy.url}
        ref = f"registry.test:{registry.port}/ci/plain:cache"
        Machine(tmp_path / "a", env)("build", "--cache-to", f"type=registry,ref={ref},registry.insecure=true",
                                     str(ctx))
        strict = Machine(tmp_path / "b", env)("build", "--cache-from", f"type=registry,ref={ref}", str(ctx)).stdout
        assert "[Warning] --cache-from" in strict and "CACHED" not in strict
        insecure = Machine(tmp_path / "c", env)("build", "--cache-from",
                                                f"type=registry,ref={ref},registry.insecure=true", str(ctx)).stdout
        assert set(step_results(insecure).values()) == {"CACHED"}, insecure
