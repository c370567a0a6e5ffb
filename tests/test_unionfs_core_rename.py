"""Unit tests of the pure core (unionfs.core): renames, redirects and their on-disk records."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core.backing import RENAME_EXCHANGE, RENAME_NOREPLACE
from unionfs_core_support import ME, Layers, names, needs_root, read, walk, whiteout, write_file


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


# --- 6. rename -----------------------------------------------------------------------------------


def test_rename_lower_directory_uses_redirect_not_copy(layers: Layers) -> None:
    low = layers.lowers[1]
    for i in range(50):
        write_file(low / "src" / f"f{i}", str(i))
    write_file(low / "src" / "sub" / "deep", "deep")
    fs = layers.open()
    fs.rename(fs.root, "src", fs.root, "dst")
    assert names(fs) == {"dst"}
    assert len(names(fs, "dst")) == 51
    assert read(fs, "dst/sub/deep") == b"deep"
    # only the directory itself was copied up
    assert sorted(os.listdir(layers.upper / "dst")) == []
    redirect = ondisk.read_redirect(str(layers.upper / "dst"))
    assert redirect == "/src"
    assert any(t.startswith("redirect /src -> /dst") for t in layers.traces)
    fresh = layers.open()
    assert names(fresh) == {"dst"} and len(names(fresh, "dst")) == 51
    # renaming again keeps pointing at the lower path
    fresh.rename(fresh.root, "dst", fresh.root, "again")
    assert ondisk.read_redirect(str(layers.upper / "again")) == "/src"
    assert read(layers.open(), "again/f7") == b"7"


def test_rename_file_over_existing_and_over_whiteout(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "a", "A")
    write_file(low / "b", "B")
    write_file(low / "c", "C")
    fs = layers.open()
    fs.rename(fs.root, "a", fs.root, "b")
    assert names(fs) == {"b", "c"} and read(fs, "b") == b"A"
    fs.unlink(fs.root, "c")
    fs.rename(fs.root, "b", fs.root, "c")
    assert names(fs) == {"c"} and read(fs, "c") == b"A"
    assert names(layers.open()) == {"c"}


def test_rename_noreplace_and_exchange(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "a", "A")
    write_file(low / "d" / "in-d")
    fs = layers.open()
    fs.mkdir(fs.root, "e", 0o755, ME)
    with pytest.raises(FileExistsError):
        fs.rename(fs.root, "a", fs.root, "d", RENAME_NOREPLACE)
    fs.rename(fs.root, "d", fs.root, "e", RENAME_EXCHANGE)
    assert names(fs, "e") == {"in-d"} and names(fs, "d") == set()
    fs.rename(fs.root, "a", fs.root, "new", RENAME_NOREPLACE)
    assert read(fs, "new") == b"A"
    fresh = layers.open()
    assert names(fresh, "e") == {"in-d"} and names(fresh, "d") == set()
    assert names(fresh) == {"d", "e", "new"}


@needs_root
def test_redirect_is_followed_per_layer_through_whited_out_ancestors(tmp_path: Path) -> None:
    """A lower directory renamed away (redirect "/a/d") must not pick up, after a remount, what a
    middle layer hid by whiting out its parent ``a`` (fsops seed 96: a deleted file came back)."""
    layers = Layers(tmp_path, nlowers=3)
    top, middle, bottom = layers.lowers
    write_file(top / "a" / "d" / "kept")
    whiteout(middle / "a")
    write_file(bottom / "a" / "d" / "hidden")
    (top / "n").mkdir()
    fs = layers.open()
    fs.rename(walk(fs, "a"), "d", walk(fs, "n"), "m")
    assert names(fs, "n/m") == {"kept"}
    assert names(layers.open(), "n/m") == {"kept"}


@needs_root
def test_redirect_inside_an_opaque_directory_is_followed(layers: Layers) -> None:
    """An absolute redirect reaches the lowers from the root, also below an opaque directory."""
    write_file(layers.lowers[0] / "a" / "f")
    write_file(layers.lowers[0] / "c" / "old")
    fs = layers.open()
    fs.unlink(walk(fs, "c"), "old")
    fs.rmdir(fs.root, "c")
    fs.mkdir(fs.root, "c", 0o755, ME)
    fs.rename(fs.root, "a", walk(fs, "c"), "a")
    assert names(fs, "c/a") == {"f"}
    fresh = layers.open()
    assert names(fresh, "c") == {"a"} and names(fresh, "c/a") == {"f"}


@needs_root
def test_rename_lower_directory_over_nonempty_upper_directory_changes_nothing(layers: Layers) -> None:
    """ENOTEMPTY after trying the upper rename as the kernel does (RENAME_WHITEOUT): both stay."""
    write_file(layers.lowers[0] / "p" / "src" / "f", "lower")
    fs = layers.open()
    fs.mkdir(fs.root, "t", 0o755, ME)
    node, fd = fs.create(walk(fs, "t"), "g", 0o644, os.O_WRONLY, ME)
    fs.release(node, fd)
    with pytest.raises(OSError) as err:
        fs.rename(walk(fs, "p"), "src", fs.root, "t")
    assert err.value.errno == errno.ENOTEMPTY
    assert names(fs, "p") == {"src"} and names(fs, "t") == {"g"}
    # the kernel copies up the source before it tries: a directory, no whiteout
    assert os.listdir(layers.upper / "p") == ["src"] and (layers.upper / "p" / "src").is_dir()
    assert os.listdir(layers.upper / "t") == ["g"]
    assert names(layers.open(), "p/src") == {"f"}


def test_rename_directory_over_merged_directory_whose_entries_are_whited_out(layers: Layers) -> None:
    write_file(layers.lowers[0] / "target" / "gone")
    write_file(layers.lowers[0] / "src" / "keep")
    fs = layers.open()
    fs.unlink(walk(fs, "target"), "gone")
    fs.rename(fs.root, "src", fs.root, "target")
    assert names(fs, "target") == {"keep"}
    assert names(layers.open(), "target") == {"keep"}


def test_upper_directory_moved_over_lower_name_is_opaque(layers: Layers) -> None:
    write_file(layers.lowers[0] / "t" / "lower-only")
    fs = layers.open()
    fs.mkdir(fs.root, "new", 0o755, ME)
    walk(fs, "t")
    fs.unlink(walk(fs, "t"), "lower-only")
    fs.rmdir(fs.root, "t")
    fs.rename(fs.root, "new", fs.root, "t")
    assert names(fs, "t") == set()
    assert names(layers.open(), "t") == set()


def test_rename_away_directory_created_over_whiteout_keeps_whiteout(layers: Layers) -> None:
    write_file(layers.lowers[0] / "d" / "x")
    fs = layers.open()
    fs.unlink(walk(fs, "d"), "x")
    fs.rmdir(fs.root, "d")
    fs.mkdir(fs.root, "d", 0o755, ME)
    fs.rename(fs.root, "d", fs.root, "e")
    assert names(fs) == {"e"}
    assert names(layers.open()) == {"e"}


def test_names_of_name_max_bytes_take_renames_and_links(layers: Layers) -> None:
    """A name of NAME_MAX bytes cannot have a ``.wh.NAME`` file beside it: making it (rename, link,
    create) finds none to remove instead of failing with ENAMETOOLONG (pjdfstest rename/01.t)."""
    longest, other = "n" * 255, "m" * 255
    fs = layers.open()
    node, fd = fs.create(fs.root, longest, 0o644, os.O_RDWR, ME)
    fs.release(node, fd)
    fs.rename(fs.root, longest, fs.root, "short")
    fs.rename(fs.root, "short", fs.root, longest)
    fs.link(walk(fs, longest), fs.root, other)
    fs.unlink(fs.root, longest)
    assert names(fs) == {other}
    with pytest.raises(OSError) as e:
        fs.rename(fs.root, other, fs.root, other + "x")
    assert e.value.errno == errno.ENAMETOOLONG
