"""What the kernel keeps from lamina's replies must stay true: appends after and during listings.

A listing's entries reach the kernel as READDIRPLUS entries; whatever attributes they carry, the
kernel keeps (an O_APPEND write without writeback cache starts at the size the kernel has, without
asking). Each test runs with bare entries (unionfs.bare_entries) and with true attributes for
every entry (its switch off), the two ways lamina may answer a listing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from unionfs.bare_entries import SWITCH
from unionfs.startup import NO_PATCHES_ENV

pytestmark = pytest.mark.fuse

FILES = 50


@pytest.fixture(params=["bare-entries", "true-attributes"])
def listing_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server (a child process) inherits the switch from the environment."""
    monkeypatch.setenv(SWITCH, "on" if request.param == "bare-entries" else "off")
    return str(request.param)


def _layers(base: Path) -> tuple[Path, Path, Path]:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower / "d", upper / "e", work):
        d.mkdir(parents=True)
    return lower, upper, work


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_append_right_after_a_listing(tmp_path: Path, union_mount: Callable, listing_mode: str,
                                      where: str) -> None:
    """listdir, then open(O_APPEND) and write with no stat between, in a fresh process on a fresh
    mount: the write lands after the data (it overwrote the start while listings said size 0)."""
    lower, upper, work = _layers(tmp_path)
    directory = "d" if where == "lower" else "e"
    (lower if where == "lower" else upper).joinpath(directory, "f").write_bytes(b"orig\n")
    m = union_mount([lower], upper, work).mountpoint
    script = (f"import os; os.listdir({str(m / directory)!r}); "
              f"fd = os.open({str(m / directory / 'f')!r}, os.O_WRONLY | os.O_APPEND); os.write(fd, b'mod\\n')")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (m / directory / "f").read_bytes() == b"orig\nmod\n"


def test_appends_while_another_process_lists(tmp_path: Path, union_mount: Callable, listing_mode: str) -> None:
    """fuse-overlayfs's test-stress: appends to 50 lower and 50 upper files while ``ls`` runs in a
    loop; afterwards every file holds its first line and every appended line, each once."""
    lower, upper, work = _layers(tmp_path)
    for i in range(FILES):
        (lower / "d" / f"f{i}").write_bytes(b"lower\n")
        (upper / "e" / f"f{i}").write_bytes(b"upper\n")
    m = union_mount([lower], upper, work).mountpoint
    names = [m / "d" / f"f{i}" for i in range(FILES)] + [m / "e" / f"f{i}" for i in range(FILES)]
    rounds, writers = 6, 2
    stop = threading.Event()

    def list_repeatedly() -> None:
        while not stop.is_set():
            subprocess.run(["ls", str(m / "d"), str(m / "e")], stdout=subprocess.DEVNULL, check=True)

    def append(writer: int) -> None:
        for r in range(rounds):
            for path in names:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, f"w{writer}r{r}\n".encode())
                finally:
                    os.close(fd)

    lister = threading.Thread(target=list_repeatedly)
    lister.start()
    try:
        threads = [threading.Thread(target=append, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        lister.join()
    expected_tail = Counter(f"w{w}r{r}" for w in range(writers) for r in range(rounds))
    first_line = {"d": "lower", "e": "upper"}
    damaged = []
    for path in names:
        first, *rest = path.read_text().splitlines()
        if first != first_line[path.parent.name] or Counter(rest) != expected_tail:
            damaged.append(path.relative_to(m))
    assert not damaged, f"{len(damaged)} of {len(names)} files lost data: {damaged[:5]}"


def test_bare_entry_writer_zeroes_only_the_node_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyfuse3

    from unionfs.bare_entries import bare_entry_writer

    monkeypatch.delenv(SWITCH, raising=False)
    monkeypatch.delenv(NO_PATCHES_ENV, raising=False)
    make_bare = bare_entry_writer(pyfuse3.EntryAttributes)
    assert make_bare is not None
    entry = pyfuse3.EntryAttributes()
    entry.st_ino, entry.generation, entry.st_mode, entry.st_size = 77, 5, 0o100600, 123
    make_bare(entry)
    assert (entry.st_ino, entry.generation, entry.st_mode, entry.st_size) == (0, 5, 0o100600, 123)


def test_no_patches_switch_turns_bare_entries_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAMINA_NO_PATCHES is the one switch for every change to another library, this one included."""
    import pyfuse3

    from unionfs.bare_entries import bare_entry_writer

    monkeypatch.delenv(SWITCH, raising=False)
    monkeypatch.setenv(NO_PATCHES_ENV, "1")
    assert bare_entry_writer(pyfuse3.EntryAttributes) is None


def test_bare_entry_writer_refuses_what_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyfuse3

    from unionfs.bare_entries import bare_entry_writer

    class Other:
        st_ino = 0

    monkeypatch.delenv(SWITCH, raising=False)
    assert bare_entry_writer(Other) is None
    monkeypatch.setenv(SWITCH, "off")
    assert bare_entry_writer(pyfuse3.EntryAttributes) is None
