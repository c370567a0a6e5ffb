"""The mount specification handed to a server process: one dataclass, one versioned JSON form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unionfs.core.stack import LayerStack
from unionfs.mount import MountSpec, command_line, mount_union
from unionfs.options import SPEC_SCHEMA, OptionError, ServerOptions, parse_args


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    paths = [tmp_path / n for n in names]
    for p in paths:
        p.mkdir()
    return paths


def test_spec_round_trip_and_no_option_string(tmp_path: Path) -> None:
    top, bottom, upper, work, mnt = _dirs(tmp_path, "t:1,x", "b\\2", "u", "w", "m:nt")
    spec = MountSpec(LayerStack.from_top_down([top, bottom]), upper, work, mnt,
                     options=["layer_xattr", "redirect_dir=off"], trace=tmp_path / "trace")
    argv = command_line(spec)
    assert "-o" not in argv and argv[-1].startswith("--spec=")
    opts = parse_args(argv[3:])
    assert opts == spec.server_options()
    assert opts.lowers == [str(top), str(bottom)] and opts.mountpoint == str(mnt)
    assert opts.flags == {"layer_xattr"} and opts.redirect_dir is False and opts.trace == str(tmp_path / "trace")


@pytest.mark.parametrize(("change", "message"), [
    ({"schema": "lamina-unionfs-mount/0"}, "expected schema"),
    ({"lowers": "/a:/b"}, "lowers must be a list"),
    ({"flags": ["allow_other", "exec_anything"]}, "flags must be"),
    ({"extra": 1}, "unknown field"),
    ({"upper": 3}, "upper must be a path"),
    ({"lowers": [], "upper": None}, "no lowerdir"),
])
def test_bad_spec_is_one_line(tmp_path: Path, change: dict[str, object], message: str) -> None:
    (low,) = _dirs(tmp_path, "low")
    raw = json.loads(ServerOptions([str(low)], None, None, str(tmp_path)).to_json())
    raw.update(change)
    with pytest.raises(OptionError, match=message):
        ServerOptions.from_json(json.dumps(raw))
    result = subprocess.run([sys.executable, "-m", "unionfs", "-f", "--spec=" + json.dumps(raw)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_spec_excludes_an_option_string(tmp_path: Path) -> None:
    (low,) = _dirs(tmp_path, "low")
    spec = ServerOptions([str(low)], None, None, str(tmp_path)).to_json()
    with pytest.raises(OptionError, match="--spec names everything"):
        parse_args(["--spec=" + spec, "-o", f"lowerdir={low}", str(tmp_path)])
    assert SPEC_SCHEMA in spec


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_layer_names_with_separators_mount(tmp_path: Path) -> None:
    """Colons, commas and backslashes in layer paths: no escaping to get wrong on the way."""
    top, bottom, mnt = _dirs(tmp_path, "top:a,b", "bottom\\c", "mnt")
    (bottom / "below").write_text("b")
    (top / "above").write_text("a")
    with mount_union(MountSpec(LayerStack.from_top_down([top, bottom]), None, None, mnt)):
        assert sorted(os.listdir(mnt)) == ["above", "below"]
