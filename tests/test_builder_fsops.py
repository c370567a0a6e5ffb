"""Pure tests of the builder's layer view, layer writing helpers and build-context handling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.context import BuildContext
from builder.dockerignore import IgnoreRules
from builder.fsops import LayerView, ensure_parents, prune_empty_dirs, resolve_dir_in_image
from lamina.errors import BuildError
from unionfs.core import ondisk
from unionfs.core.stack import LayerStack


@pytest.fixture
def stack(tmp_path: Path) -> LayerView:
    bottom, middle, top = (tmp_path / n for n in ("bottom", "middle", "top"))
    for layer in (bottom, middle, top):
        layer.mkdir()
    (bottom / "d").mkdir()
    (bottom / "d" / "a").write_text("a")
    (bottom / "d" / "b").write_text("b")
    (bottom / "x").mkdir()
    (bottom / "x" / "hidden").write_text("h")
    (bottom / "usr" / "lib").mkdir(parents=True)
    (bottom / "usr" / "lib" / "libz").write_text("z")
    os.symlink("usr/lib", bottom / "lib")
    os.symlink("/usr/lib/libz", bottom / "abs-link")
    (middle / "d").mkdir()
    (middle / "d" / (ondisk.WHITEOUT_PREFIX + "a")).write_text("")
    (middle / "d" / "c").write_text("c")
    (middle / "gone").write_text("")
    (top / "x").mkdir()
    (top / "x" / ondisk.OPAQUE_MARKER).write_text("")
    (top / "x" / "new").write_text("n")
    (top / (ondisk.WHITEOUT_PREFIX + "gone")).write_text("")
    return LayerView(LayerStack.from_top_down([top, middle, bottom]))


def names(view: LayerView, path: str) -> list[str]:
    entry = view.lookup(path)
    assert entry is not None and entry.is_dir
    return sorted(name for name, *_ in view.list_dir(entry))


def test_whiteouts_and_merging(stack: LayerView) -> None:
    assert stack.lookup("/d/a") is None
    assert names(stack, "/d") == ["b", "c"]
    assert stack.read_file("/d/c") == b"c"
    assert stack.lookup("/gone") is None
    assert "gone" not in names(stack, "/")


def test_opaque_directory_hides_lower_content(stack: LayerView) -> None:
    assert names(stack, "/x") == ["new"]
    assert stack.lookup("/x/hidden") is None


def test_symlinks_resolve_inside_the_image(stack: LayerView) -> None:
    assert stack.read_file("/lib/libz") == b"z"
    assert stack.read_file("/abs-link") == b"z"
    link = stack.lookup("/abs-link", follow=False)
    assert link is not None and link.is_symlink
    # `..` after a symlink is physical, as in the kernel: /lib/.. is /usr.
    assert stack.read_file("/d/../lib/../lib/libz") == b"z"
    assert stack.lookup("/lib/../usr/lib/libz") is None
    assert resolve_dir_in_image(stack, "/lib/sub") == "/usr/lib/sub"


def test_ensure_parents_keeps_the_lower_directory_metadata(stack: LayerView, tmp_path: Path) -> None:
    bottom = tmp_path / "bottom"
    os.chmod(bottom / "usr", 0o750)
    diff = tmp_path / "diff"
    diff.mkdir()
    host = ensure_parents(str(diff), stack, "/usr/new/deeper")
    assert host == str(diff / "usr" / "new" / "deeper")
    assert (diff / "usr").stat().st_mode & 0o7777 == (0o750 if os.geteuid() == 0 else 0o750 | 0o700)
    assert (diff / "usr" / "new").stat().st_mode & 0o777 == 0o755


def test_prune_removes_only_scaffolding(stack: LayerView, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "cache" / "deep").mkdir(parents=True)  # a mount point and its new parent
    (upper / "d").mkdir()  # a copied-up parent, unchanged
    (upper / "d" / "mountpoint").mkdir()
    (upper / "kept").mkdir()
    (upper / "kept" / "file").write_text("content")
    (upper / "kept" / "target").mkdir()
    (upper / "file-mount").write_text("")
    prune_empty_dirs(str(upper), ["/cache/deep", "/d/mountpoint", "/kept/target", "/file-mount"], stack)
    assert sorted(p.name for p in upper.iterdir()) == ["kept"]
    assert sorted(p.name for p in (upper / "kept").iterdir()) == ["file"]


# --- build context ---------------------------------------------------------------------------------


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "src" / "pkg").mkdir(parents=True)
    (ctx / "src" / "main.py").write_text("main")
    (ctx / "src" / "pkg" / "mod.py").write_text("mod")
    (ctx / "src" / "notes.md").write_text("notes")
    (ctx / "a.txt").write_text("a")
    (ctx / "b.txt").write_text("b")
    os.symlink("/etc/passwd", ctx / "escape")
    os.symlink("a.txt", ctx / "inside")
    return ctx


def test_context_resolution(context: Path) -> None:
    ctx = BuildContext(context, IgnoreRules.from_text("src/*.md\n"))
    assert ctx.resolve("*.txt") == ["a.txt", "b.txt"]
    assert ctx.resolve("/src/../a.txt") == ["a.txt"]
    assert ctx.resolve("src/*/mod.py") == ["src/pkg/mod.py"]
    assert ctx.resolve("inside") == ["inside"]
    with pytest.raises(BuildError, match="not found"):
        ctx.resolve("src/notes.md")
    with pytest.raises(BuildError, match="nothing matches"):
        ctx.resolve("*.rs")
    with pytest.raises(BuildError, match="outside the build context"):
        ctx.resolve("../etc/passwd")
    with pytest.raises(BuildError, match="outside the build context"):
        ctx.resolve("escape")
    assert [rel for rel, _, _ in ctx.walk("src")] == ["src", "src/main.py", "src/pkg", "src/pkg/mod.py"]


def test_context_digest_follows_content_not_mtime(context: Path, tmp_path: Path) -> None:
    ctx = BuildContext(context, IgnoreRules([]), tmp_path / "stat-cache.json")
    first = ctx.digest(["src"])
    os.utime(context / "src" / "main.py", (1, 1))
    assert BuildContext(context, IgnoreRules([]), tmp_path / "stat-cache.json").digest(["src"]) == first
    (context / "src" / "main.py").write_text("changed")
    second = BuildContext(context, IgnoreRules([]), tmp_path / "stat-cache.json").digest(["src"])
    assert second != first
    os.chmod(context / "src" / "main.py", 0o600)
    assert BuildContext(context, IgnoreRules([])).digest(["src"]) != second
