"""The walk-through of docs/union-filesystems.md on the article's Flask image, checked (opt-in:
LAMINA_NETWORK_TESTS=1).

The image is built as in tests/test_builder_network.py (a debootstrap base, Debian's pip, the host's
CA bundle for PyPI), as an unprivileged user. Each claim of the walk-through is checked against a
reference outside the inspector: pip's own RECORD files for what the pip layer added, the base
tarball and a container's view for apt's whiteouts, ``find`` in a container for the bytes the image
shows and for the ``.pyc`` files a later cleanup hides.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import UnprivilegedUser
from test_builder_network import APP_PY, FLASK_DOCKERFILE, HOST_CA, _build, _import_base
from test_builder_network import debian_tarball  # noqa: F401  (a fixture, used by name)

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.unprivileged, pytest.mark.fuse]

SITE = "/usr/local/lib/python3.11/dist-packages"
LISTS = "/var/lib/apt/lists"
RUNTIME_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")   # bound over the image's copies
CLEANED_LATE_DOCKERFILE = (
    "FROM my-flask-image\n"
    "RUN rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb"
    " && find / -xdev -name __pycache__ -prune -exec rm -rf {} +\n")


def _json(user: UnprivilegedUser, *args: str) -> Any:
    result = user.lamina(*args, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _in_container(user: UnprivilegedUser, image: str, script: str) -> list[str]:
    result = user.lamina("run", "--rm", image, "sh", "-c", script, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _files(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node["kind"] != "dir":
        yield node
    for child in node.get("children", []):
        yield from _files(child)


def _shown_bytes(user: UnprivilegedUser, image: str) -> int:
    """The bytes of the files and symlinks a container of the image sees (a hard-linked inode once),
    on its root filesystem: the runtime's own :data:`RUNTIME_FILES` are not the image's."""
    found = _in_container(user, image, "find / -maxdepth 0 -printf '%D\\n'; "
                                       r"find / -xdev \( -type f -o -type l \) -printf '%D %i %s\n'")
    root_device, entries = found[0], [line.split() for line in found[1:]]
    sizes = {inode: int(size) for device, inode, size in entries if device == root_device}
    return sum(sizes.values())


def _runtime_covered_bytes(tarball: Path) -> int:
    """The bytes of the base's copies of :data:`RUNTIME_FILES`, which a container cannot see."""
    with tarfile.open(tarball) as base:
        return sum(m.size for m in base.getmembers() if m.name.removeprefix("./") in RUNTIME_FILES)


@pytest.fixture
def flask_user(unpriv_subids: UnprivilegedUser, debian_tarball: Path) -> UnprivilegedUser:  # noqa: F811
    _import_base(unpriv_subids, debian_tarball)
    ctx = unpriv_subids.workdir / "flask"
    ctx.mkdir()
    (ctx / "app.py").write_text(APP_PY)
    (ctx / "host-ca.crt").write_bytes(HOST_CA.read_bytes())
    (ctx / "Dockerfile").write_text(FLASK_DOCKERFILE)
    _build(unpriv_subids, ctx, "my-flask-image")
    return unpriv_subids


def test_flask_walk_through_claims_hold(flask_user: UnprivilegedUser, debian_tarball: Path) -> None:  # noqa: F811
    user = flask_user
    stack = _json(user, "layers", "my-flask-image", "--json")
    layers = stack["layers"]
    assert [layer["instruction"].split()[0] for layer in layers] == ["lamina", "RUN", "COPY", "RUN", "WORKDIR", "COPY"]

    # The pip layer added exactly the files pip's RECORDs list, at the sizes they give.
    record = _in_container(user, "my-flask-image", f"cat {SITE}/*.dist-info/RECORD")
    recorded = {}
    for line in record:
        name, _, size = line.rsplit(",", 2)
        path = "/usr/local/bin/" + name.removeprefix("../../../bin/") if name.startswith("../") else f"{SITE}/{name}"
        recorded[path] = int(size) if size else None
    tree = _json(user, "layers", "my-flask-image", "--tree", "--layer", "4", "--changes-only", "--json")
    added = {f["path"]: f["size"] for f in _files(tree["trees"][0]["tree"])}
    assert set(added) == set(recorded)
    assert any(p.startswith(f"{SITE}/flask/__pycache__/") for p in added)
    assert {p: s for p, s in added.items() if recorded[p] is not None} == {
        p: s for p, s in recorded.items() if s is not None}
    assert not any(f["change"] != "A" for f in _files(tree["trees"][0]["tree"]))

    # apt's whiteouts: what the base's lists had and the image's lists lack.
    with tarfile.open(debian_tarball) as base:
        base_lists = {"/" + m.name.removeprefix("./") for m in base.getmembers()
                      if m.isfile() and m.name.startswith(f".{LISTS}/") and m.name.count("/") == 5}
    image_lists = {f"{LISTS}/{name}" for name in _in_container(user, "my-flask-image", f"ls -A {LISTS}")}
    assert set(layers[1]["whiteouts"]) == base_lists - image_lists and layers[1]["whiteouts"]

    # --wasted names what the WASTED column adds up, and a container sees the rest.
    wasted = _json(user, "layers", "my-flask-image", "--wasted", "--json")
    assert sum(f["size"] for f in wasted["hidden_files"]) == wasted["wasted_bytes"] == sum(
        layer["wasted"] for layer in layers) == stack["wasted_bytes"] > 0
    assert {f["added_by"] for f in wasted["hidden_files"]} == {1}
    covered = _runtime_covered_bytes(debian_tarball)
    assert _shown_bytes(user, "my-flask-image") + covered == stack["total_bytes"] - stack["wasted_bytes"]

    # dive's CI gate on its efficiency, either side of the figure.
    efficiency = stack["dive"]["efficiency"]
    assert user.lamina("layers", "my-flask-image", "--fail-on-efficiency", f"{efficiency - 0.001:.4f}",
                       timeout=600).returncode == 0
    refused = user.lamina("layers", "my-flask-image", "--fail-on-efficiency", f"{efficiency + 0.001:.4f}", timeout=600)
    assert refused.returncode == 1 and "image efficiency is too low" in refused.stderr

    # Cleaning up in a later RUN: every .pyc becomes waste for lamina, and none is in dive's list.
    pycs = set(_in_container(user, "my-flask-image", "find / -xdev -name '*.pyc'"))
    late = user.workdir / "late"
    late.mkdir()
    (late / "Dockerfile").write_text(CLEANED_LATE_DOCKERFILE)
    _build(user, late, "flask-cleaned-late")
    wasted = _json(user, "layers", "flask-cleaned-late", "--wasted", "--json")
    hidden = {f["path"] for f in wasted["hidden_files"] if f["hidden_by"] == 7}
    assert pycs and pycs <= hidden
    assert not any(d["path"].endswith(".pyc") for d in wasted["dive"]["inefficiencies"])
    stack = _json(user, "layers", "flask-cleaned-late", "--json")
    assert _shown_bytes(user, "flask-cleaned-late") + covered == stack["total_bytes"] - stack["wasted_bytes"]
