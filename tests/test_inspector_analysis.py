"""The pure layer analysis on layer directories made by hand (no store, no mount)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.inspector.analysis import (
    Event,
    LayerInput,
    analyze,
    clean_instruction,
    instructions_for_layers,
    normalize,
)
from unionfs.core import ondisk


def write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def whiteout(root: Path, rel: str, style: ondisk.WhiteoutStyle = ondisk.WhiteoutStyle.CHAR_DEVICE) -> None:
    parent = (root / rel).parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ondisk.make_whiteout(fd, Path(rel).name, prefer=style)
    finally:
        os.close(fd)


@pytest.fixture
def three_layers(tmp_path: Path) -> list[LayerInput]:
    """Layer 1 provides /etc/motd, layer 2 shadows it, layer 3 deletes it."""
    l1, l2, l3 = (tmp_path / f"l{i}" for i in (1, 2, 3))
    for d in (l1, l2, l3):
        d.mkdir()
    write(l1, "etc/motd", b"x" * 100)
    write(l1, "etc/keep", b"k" * 10)
    write(l1, "opt/app/old1", b"o" * 30)
    write(l1, "opt/app/old2", b"o" * 20)
    write(l2, "etc/motd", b"y" * 200)
    write(l2, "bin/tool", b"t" * 5)
    whiteout(l3, "etc/motd")
    (l3 / "opt/app").mkdir(parents=True)
    ondisk.mark_opaque(str(l3 / "opt/app"))
    write(l3, "opt/app/new", b"n" * 7)
    return [LayerInput(l1, "sha256:aaa", "ADD base"), LayerInput(l2, "sha256:bbb", "COPY motd /etc/"),
            LayerInput(l3, "sha256:ccc", "RUN rm /etc/motd")]


def test_provided_shadowed_deleted(three_layers: list[LayerInput]) -> None:
    a = analyze(three_layers)
    motd = a.history("/etc/motd")
    assert motd is not None
    assert not motd.visible and motd.provider is None
    assert [(e.layer, e.event) for e in motd.events] == [(0, Event.ADDED), (1, Event.CHANGED), (2, Event.DELETED)]
    assert [e.layer for e in motd.deleted_by] == [2]

    keep = a.history("etc/keep")
    assert keep is not None and keep.provider == 0 and keep.shadowed == []


def test_shadowed_before_deletion(tmp_path: Path, three_layers: list[LayerInput]) -> None:
    a = analyze(three_layers[:2])
    motd = a.history("/etc/motd")
    assert motd is not None and motd.provider == 1 and motd.shadowed == [0]


def test_opaque_directory_hides_lower_entries(three_layers: list[LayerInput]) -> None:
    a = analyze(three_layers)
    old = a.history("/opt/app/old1")
    assert old is not None and not old.visible
    assert old.events[-1].event is Event.HIDDEN and old.events[-1].cause == "/opt/app"
    new = a.history("/opt/app/new")
    assert new is not None and new.provider == 2
    app = a.history("/opt/app")
    assert app is not None and app.visible and app.provider == 2
    assert a.layers[2].opaque_dirs == ["/opt/app"]


def test_layer_counts_sizes_and_waste(three_layers: list[LayerInput]) -> None:
    a = analyze(three_layers)
    l1, l2, l3 = a.layers
    assert (l1.size, l2.size, l3.size) == (160, 205, 7)
    # l1: etc, etc/motd, etc/keep, opt, opt/app, old1, old2; l2: etc/motd changed; bin, bin/tool added
    assert (l1.added, l1.changed, l1.deleted) == (7, 0, 0)
    assert (l2.added, l2.changed, l2.deleted) == (2, 1, 0)
    assert (l3.added, l3.changed, l3.deleted) == (1, 0, 3)  # motd whited out; old1, old2 under the opaque dir
    assert l3.whiteouts == ["/etc/motd"]
    # l1's motd (100) was overwritten, its old1/old2 (50) hidden by the opaque dir; l2's motd deleted.
    assert (l1.wasted, l2.wasted, l3.wasted) == (150, 200, 0)
    assert a.total_bytes == 372 and a.wasted_bytes == 350
    assert a.efficiency == pytest.approx(1 - 350 / 372)


def test_wh_file_whiteouts_and_parent_whiteout(tmp_path: Path) -> None:
    l1, l2 = tmp_path / "a", tmp_path / "b"
    write(l1, "srv/data/x", b"1234")
    write(l1, "srv/y", b"12")
    whiteout(l2, "srv/data", ondisk.WhiteoutStyle.WH_FILE)
    assert (l2 / "srv" / ".wh.data").exists()
    a = analyze([LayerInput(l1), LayerInput(l2)])
    x = a.history("/srv/data/x")
    assert x is not None and not x.visible
    assert x.events[-1] == type(x.events[-1])(1, Event.HIDDEN, "/srv/data")
    data = a.history("/srv/data")
    assert data is not None and data.events[-1].event is Event.DELETED
    assert a.layers[1].deleted == 2 and a.layers[1].files == 1  # srv/data and srv/data/x; one entry: srv
    assert a.layers[0].wasted == 4


def test_file_replacing_directory_and_back(tmp_path: Path) -> None:
    l1, l2, l3 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(l1, "p/inner", b"abc")
    write(l2, "p", b"file")
    write(l3, "p/again", b"zz")
    a = analyze([LayerInput(l1), LayerInput(l2), LayerInput(l3)])
    inner = a.history("/p/inner")
    assert inner is not None and not inner.visible and inner.events[-1].cause == "/p"
    p = a.history("/p")
    assert p is not None and p.is_dir and p.provider == 2
    assert [e.event for e in p.events] == [Event.ADDED, Event.CHANGED, Event.CHANGED]
    assert a.layers[0].wasted == 3 and a.layers[1].wasted == 4


def test_hard_links_count_once(tmp_path: Path) -> None:
    l1 = tmp_path / "a"
    write(l1, "one", b"q" * 50)
    os.link(l1 / "one", l1 / "two")
    a = analyze([LayerInput(l1)])
    assert a.layers[0].size == 50 and a.layers[0].files == 2


def test_missing_layer_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        analyze([LayerInput(tmp_path / "nope")])


def test_instructions_and_paths() -> None:
    assert normalize("a//b/../c/") == "/a/c" and normalize("/../..") == "/"
    assert clean_instruction("/bin/sh -c #(nop) COPY file:abc in /etc/ ") == "COPY file:abc in /etc/"
    assert clean_instruction("/bin/sh -c apk add x") == "RUN apk add x"
    history = [{"created_by": "ADD rootfs"}, {"created_by": "ENV A=1", "empty_layer": True},
               {"created_by": "RUN touch x"}]
    assert instructions_for_layers(history, 2) == ["ADD rootfs", "RUN touch x"]
    assert instructions_for_layers(history, 3) == ["", "ADD rootfs", "RUN touch x"]
    assert instructions_for_layers(history, 1) == ["RUN touch x"]


def test_opaque_directory_does_not_merge_with_lower_copies(three_layers: list[LayerInput]) -> None:
    a = analyze(three_layers)
    app = a.history("/opt/app")
    assert app is not None and app.provider == 2
    assert app.shadowed == []                       # layer 1's /opt/app is hidden, not merged
    assert [e.event for e in app.events] == [Event.ADDED, Event.OPAQUE]
    opt = a.history("/opt")
    assert opt is not None and opt.provider == 2 and opt.shadowed == [0]   # a plain merge


def test_directory_over_file_over_directory_does_not_merge(tmp_path: Path) -> None:
    l1, l2, l3 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(l1, "p/inner", b"abc")
    write(l2, "p", b"file")
    write(l3, "p/again", b"zz")
    p = analyze([LayerInput(l1), LayerInput(l2), LayerInput(l3)]).history("/p")
    assert p is not None and p.provider == 2
    assert [(c.layer, c.is_dir) for c in p.lower_copies] == [(1, False)]   # layer 1's directory is gone


def test_replay_shows_what_the_merged_view_shows(tmp_path: Path) -> None:
    """The analysis replays layers bottom up (the OCI applier's order); what it ends up showing is
    what the union's merged view (itself checked against the kernel's overlayfs) shows."""
    from test_unionfs_view import build_layers

    from unionfs.core.view import MergedView

    stack = build_layers(tmp_path, redirects=False)
    analysis = analyze([LayerInput(path) for path in stack.bottom_up()])
    shown = sorted(path for path, h in analysis.paths.items() if h.visible and path != "/")
    with MergedView(stack) as view:
        assert shown == sorted(entry.path for entry in view.walk())
