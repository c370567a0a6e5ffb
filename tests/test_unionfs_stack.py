"""LayerStack: the order of a union's layers is said once, where the stack is built."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core.stack import LayerStack
from unionfs.mount import MountSpec, mount_union


def test_named_constructors_agree(tmp_path: Path) -> None:
    bottom, top = tmp_path / "bottom", tmp_path / "top"
    stack = LayerStack.from_bottom_up([bottom, top])
    assert stack == LayerStack.from_top_down([str(top), str(bottom)])
    assert stack.top_down() == (top, bottom)
    assert stack.bottom_up() == (bottom, top)
    assert stack.with_top(tmp_path / "c").top_down()[0] == tmp_path / "c"
    assert stack.with_bottom(tmp_path / "z").bottom_up()[0] == tmp_path / "z"
    assert len(stack) == 2 and not LayerStack.from_top_down([])
    assert pickle.loads(pickle.dumps(stack)) == stack


def test_no_stack_without_an_order(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        LayerStack((tmp_path,))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LayerStack.from_top_down(str(tmp_path))  # one path is not a stack of its characters
    with pytest.raises(TypeError):
        list(LayerStack.from_top_down([tmp_path]))  # iterating would not say which order
    with pytest.raises(AttributeError):
        LayerStack.from_top_down([tmp_path])._top_down = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        MountSpec([tmp_path], None, None, tmp_path)  # type: ignore[arg-type]


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_image_order_mounts_with_deletions_applied(tmp_path: Path) -> None:
    """An image's layers (bottom first) mount with the top layer's whiteout hiding the base's file:
    the mistake a bare list allowed (bottom-first paths given as lowerdirs) showed it again."""
    base, change, mnt = tmp_path / "base", tmp_path / "change", tmp_path / "mnt"
    for d in (base, change, mnt):
        d.mkdir()
    (base / "gone").write_text("deleted by the layer above\n")
    (base / "kept").write_text("kept\n")
    fd = os.open(change, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ondisk.make_whiteout(fd, "gone")
    finally:
        os.close(fd)
    image_order = [base, change]
    with mount_union(MountSpec(LayerStack.from_bottom_up(image_order), None, None, mnt)):
        assert sorted(os.listdir(mnt)) == ["kept"]
