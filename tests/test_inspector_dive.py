"""dive's figures, lamina's named waste and the layer trees, on layers crafted by hand.

Each expectation is worked out by hand from dive's definitions (dive/filetree/efficiency.go,
dive/image/analysis.go at github.com/wagoodman/dive), not from lamina's output: per path, dive adds
up the bytes of every layer leaf it meets (``cumulative``) and keeps the smallest (``minimum``);
efficiency = sum(minimum) / sum(cumulative); wasted = sum(cumulative) of paths met twice or more;
a whiteout weighs what the stack below held under it when that was a directory, else 0; opaque
directories are ignored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.inspector import report, trees, waste
from lamina.inspector.analysis import LayerInput, analyze
from test_inspector_analysis import three_layers, whiteout, write  # noqa: F401 (a fixture)
from unionfs.core import ondisk


def layers(tmp_path: Path, count: int) -> list[Path]:
    dirs = [tmp_path / f"l{i + 1}" for i in range(count)]
    for d in dirs:
        d.mkdir()
    return dirs


def stack(*dirs: Path) -> list[LayerInput]:
    return [LayerInput(d, f"sha256:{i:064x}", f"step {i + 1}") for i, d in enumerate(dirs)]


def test_a_file_overwritten_twice(tmp_path: Path) -> None:
    l1, l2, l3 = layers(tmp_path, 3)
    write(l1, "base", b"b" * 1000)
    write(l1, "f", b"1" * 100)
    write(l2, "f", b"2" * 200)
    write(l3, "f", b"3" * 50)
    a = analyze(stack(l1, l2, l3))
    score = waste.dive_score(a)
    # /f: 100 + 200 + 50 = 350, smallest 50; /base: 1000 once.
    assert score.efficiency == pytest.approx((50 + 1000) / (350 + 1000))
    assert score.wasted_bytes == 350                       # dive counts the copy still shown (50) too
    assert score.user_bytes == 250 and score.wasted_user_share == pytest.approx(350 / 250)
    assert [(d.path, d.count, d.cumulative) for d in score.inefficiencies] == [("/f", 3, 350)]
    # lamina names only the hidden copies: layer 1's and layer 2's, each shadowed by the next.
    hidden = waste.hidden_files(a)
    assert [(f.path, f.size, f.added_by, f.hidden_by, f.how) for f in hidden] == [
        ("/f", 200, 1, 2, "shadowed"), ("/f", 100, 0, 1, "shadowed")]
    assert sum(f.size for f in hidden) == a.wasted_bytes == 300


def test_deleted_files_and_a_deleted_directory(tmp_path: Path) -> None:
    l1, l2, l3 = layers(tmp_path, 3)
    write(l1, "a", b"a" * 100)
    write(l1, "d/x", b"x" * 10)
    write(l1, "d/y", b"y" * 20)
    write(l2, "keep", b"k" * 8)
    whiteout(l3, "a")
    whiteout(l3, "d")
    a = analyze(stack(l1, l2, l3))
    score = waste.dive_score(a)
    # /a: 100 then its whiteout (a file: weighs 0) -> cumulative 100, minimum 0, met twice.
    # /d/x 10, /d/y 20: met once each. The whiteout of the directory /d weighs what was below
    # it (30), met once: it adds 30 to both sums and is not "wasted" in dive's list.
    assert score.efficiency == pytest.approx((0 + 10 + 20 + 30 + 8) / (100 + 10 + 20 + 30 + 8))
    assert score.wasted_bytes == 100
    assert [(d.path, d.count) for d in score.inefficiencies] == [("/a", 2)]
    assert score.wasted_user_share == pytest.approx(100 / 8)
    hidden = waste.hidden_files(a)
    assert [(f.path, f.size, f.hidden_by, f.how) for f in hidden] == [
        ("/a", 100, 2, "whiteout"), ("/d/y", 20, 2, "hidden by /d"), ("/d/x", 10, 2, "hidden by /d")]
    assert a.wasted_bytes == 130


def test_duplicate_across_layers(tmp_path: Path) -> None:
    l1, l2 = layers(tmp_path, 2)
    write(l1, "lib/x.so", b"s" * 500)
    write(l2, "lib/x.so", b"s" * 500)       # the same bytes again: a COPY of an unchanged file
    a = analyze(stack(l1, l2))
    score = waste.dive_score(a)
    assert score.efficiency == pytest.approx(500 / 1000)
    assert score.wasted_bytes == 1000 and score.user_bytes == 500
    assert [(f.path, f.size, f.added_by, f.hidden_by) for f in waste.hidden_files(a)] == [("/lib/x.so", 500, 0, 1)]


def test_opaque_directory(tmp_path: Path) -> None:
    l1, l2 = layers(tmp_path, 2)
    write(l1, "o/old", b"o" * 40)
    (l2 / "o").mkdir()
    ondisk.mark_opaque(str(l2 / "o"))
    write(l2, "o/new", b"n" * 7)
    a = analyze(stack(l1, l2))
    score = waste.dive_score(a)
    # dive never records the opaque marker: /o/old and /o/new are met once each, nothing wasted.
    assert score.efficiency == 1.0 and score.wasted_bytes == 0 and score.inefficiencies == []
    # lamina: /o/old is gone from the image, its 40 bytes are waste.
    assert [(f.path, f.size, f.how) for f in waste.hidden_files(a)] == [("/o/old", 40, "hidden by /o")]


def test_dive_own_unit_case_with_real_directories(tmp_path: Path) -> None:
    """dive's TestEfficiency stack; dive expects 0.75 there only because its hand-made trees have no
    directory entry for /etc/nginx, so the whiteout weighs 0. In a real layer /etc/nginx is a
    directory, and dive's code weighs the whiteout by what the layers below held in it: 5000 + 3000.
    """
    l1, l2, l3 = layers(tmp_path, 3)
    write(l1, "etc/nginx/nginx.conf", b"c" * 2000)
    write(l1, "etc/nginx/public", b"p" * 3000)
    write(l2, "etc/nginx/nginx.conf", b"C" * 5000)
    write(l2, "etc/athing", b"t" * 10000)
    whiteout(l3, "etc/nginx")
    score = waste.dive_score(analyze(stack(l1, l2, l3)))
    assert score.efficiency == pytest.approx((2000 + 3000 + 10000 + 8000) / (7000 + 3000 + 10000 + 8000))
    assert [(d.path, d.cumulative) for d in score.inefficiencies] == [("/etc/nginx/nginx.conf", 7000)]


def test_a_directory_deleted_twice_weighs_what_each_time_held(tmp_path: Path) -> None:
    """/d is deleted, re-created with other contents, and deleted again: each whiteout weighs what
    dive's stacked tree held under /d at that moment (30 B from layer 1, then 5 B from layer 3), not
    what any layer ever held there."""
    l1, l2, l3, l4 = layers(tmp_path, 4)
    write(l1, "d/a", b"a" * 10)
    write(l1, "d/sub/b", b"b" * 20)
    whiteout(l2, "d")
    write(l3, "d/c", b"c" * 5)
    whiteout(l4, "d")
    score = waste.dive_score(analyze(stack(l1, l2, l3, l4)))
    # Leaves: /d/a 10, /d/sub/b 20 (layer 1); /d 30 (layer 2); /d/c 5 (layer 3); /d 5 (layer 4).
    assert score.efficiency == pytest.approx((10 + 20 + 5 + 5) / (10 + 20 + 35 + 5))
    assert [(d.path, d.count, d.cumulative, d.minimum) for d in score.inefficiencies] == [("/d", 2, 35, 5)]
    assert score.wasted_bytes == 35 and score.user_bytes == 5


def test_ci_thresholds(tmp_path: Path) -> None:
    l1, l2 = layers(tmp_path, 2)
    write(l1, "f", b"1" * 100)
    write(l2, "f", b"2" * 100)
    write(l2, "g", b"g" * 100)
    score = waste.dive_score(analyze(stack(l1, l2)))
    # efficiency (100 + 100) / 300; wasted 200 of 200 user bytes = 100 %.
    assert waste.check(score, waste.Thresholds(min_efficiency=0.66)) == []
    assert "efficiency is too low" in waste.check(score, waste.Thresholds(min_efficiency=0.67))[0]
    assert waste.check(score, waste.Thresholds(max_waste_percent=100)) == []
    assert "100.00% > threshold=99.9%" in waste.check(score, waste.Thresholds(max_waste_percent=99.9))[0]
    assert report.parse_thresholds("10%", "0.9") == waste.Thresholds(10.0, 0.9)
    for bad_waste, bad_efficiency, flag in (("x", None, "--fail-on-waste x: not a number"),
                                            (None, "1.5", "--fail-on-efficiency 1.5: must be between"),
                                            ("nan", None, "--fail-on-waste nan: must be between")):
        with pytest.raises(report.UsageError, match=flag):
            report.parse_thresholds(bad_waste, bad_efficiency)


def test_layer_trees_mark_changes_and_the_merged_view_follows_the_layer(
        three_layers: list[LayerInput]) -> None:  # noqa: F811 (the imported fixture)
    a = analyze(three_layers)

    def flat(node: trees.TreeNode) -> dict[str, tuple[str, int, int | None, list[str]]]:
        return {n.path: (n.change, n.total(), n.layer, n.notes) for n in node.walk() if n.path != "/"}

    changes3 = flat(trees.layer_tree(a, 2, changes_only=True))
    assert changes3 == {
        "/etc": ("", 0, 2, []),                       # scaffolding; the deleted motd is not counted in it
        "/etc/motd": ("D", 200, 1, ["whiteout"]),     # what it hid: layer 2's copy
        "/opt": ("", 7, 2, []),
        "/opt/app": ("M", 7, 2, ["opaque"]),
        "/opt/app/old1": ("D", 30, 0, ["hidden by /opt/app"]),
        "/opt/app/old2": ("D", 20, 0, ["hidden by /opt/app"]),
        "/opt/app/new": ("A", 7, 2, []),
    }
    assert flat(trees.layer_tree(a, 1, changes_only=True)) == {
        "/etc": ("", 200, 1, []), "/etc/motd": ("M", 200, 1, []), "/bin": ("A", 5, 1, []),
        "/bin/tool": ("A", 5, 1, [])}
    merged1 = flat(trees.layer_tree(a, 0))
    merged2 = flat(trees.layer_tree(a, 1))
    assert merged1["/etc/motd"] == ("A", 100, 0, []) and merged2["/etc/motd"] == ("M", 200, 1, [])
    assert merged2["/etc/keep"] == ("", 10, 0, []) and "/opt/app/new" not in merged2
    assert "/opt/app/old1" in merged2
    merged3 = flat(trees.layer_tree(a, 2))
    assert merged3["/opt/app/new"][0] == "A" and merged3["/opt/app/old1"][0] == "D"

    text = report.tree_lines(a, 3, changes_only=True)
    assert text[0] == "layer 3 of 3 (its changes): RUN rm /etc/motd"
    assert any(line.startswith("D    200 B  │   └── motd  [whiteout]") for line in text), text
    assert any("opaque directory: the layer re-created" in line for line in text)
    data = report.tree_data(a, 3, changes_only=True)[0]["tree"]
    etc = next(c for c in data["children"] if c["name"] == "etc")
    assert etc["children"][0] == {"name": "motd", "path": "/etc/motd", "kind": "file", "size": 200,
                                  "change": "D", "notes": ["whiteout"], "layer": 2}
    with pytest.raises(report.UsageError, match="--layer 4: the stack has layers 1..3"):
        report.tree_lines(a, 4, changes_only=False)


def test_container_layer_marks_copy_ups_and_redirects(tmp_path: Path) -> None:
    l1, upper = layers(tmp_path, 2)
    write(l1, "etc/passwd", b"root\n")
    write(l1, "srv/data/file", b"d" * 9)
    write(upper, "etc/passwd", b"root\nmore\n")              # copied up, then written
    (upper / "srv/moved").mkdir(parents=True)                 # a renamed directory
    import os
    os.setxattr(upper / "srv/moved", ondisk.TRUSTED_REDIRECT, b"/srv/data")
    a = analyze(stack(l1, upper), top_is_container=True)
    changes = {n.path: n for n in trees.layer_tree(a, 1, changes_only=True).walk()}
    assert changes["/etc/passwd"].change == "M" and "copy-up" in changes["/etc/passwd"].notes
    assert changes["/etc"].notes == ["copy-up"]               # the directory's attributes came up too
    assert "redirect" in changes["/srv/moved"].notes and changes["/srv/moved"].redirect == "/srv/data"
    assert "(redirect from /srv/data)  [redirect]" in "\n".join(report.tree_lines(a, 2, changes_only=True))


def test_explorer_page_keeps_hostile_names_inert(tmp_path: Path) -> None:
    """Names from a layer go into the page as data: they cannot close the script or add markup."""
    from lamina.inspector.explorer import render_explorer

    l1, l2 = layers(tmp_path, 2)
    for name in ("</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "a&amp;b"):
        write(l1, f"d/{name.replace('/', '_')}", b"x")
    write(l1, "e/\u2028line", b"x")
    whiteout(l2, "d/<img src=x onerror=alert(2)>")
    page = render_explorer(analyze(stack(l1, l2)), "hostile </script>")
    scripts = page.split("<script")
    assert len(scripts) == 3                          # the JSON data and the code, nothing injected
    assert "alert" not in scripts[2] and "<img" not in page.replace("&lt;img", "")
    assert "\u2028" not in page and "hostile &lt;/script&gt;" in page
    data = scripts[1].split(">", 1)[1].split("</script>")[0]
    import json
    decoded = json.loads(data)
    assert "/d/<_script><script>alert(1)<_script>" in {r["p"] for r in decoded["paths"]}


def test_terminal_explorer_state_follows_keys(three_layers: list[LayerInput]) -> None:  # noqa: F811
    from lamina.inspector.terminal import HELP, ExplorerState

    state = ExplorerState(analyze(three_layers))
    assert state.layer == 2 and state.focus == "layers" and state.changes_only
    assert [r.node.path for r in state.rows] == ["/etc", "/etc/motd", "/opt", "/opt/app", "/opt/app/new",
                                                "/opt/app/old1", "/opt/app/old2"]
    assert state.tree_line(state.rows[1]) == "D    200 B      motd  [whiteout]"   # depth 1, no opener
    assert [text.split()[0] for _, text in state.layer_lines()] == ["3", "2", "1"]
    assert state.status() == HELP
    state.key("KEY_DOWN")                       # the layer pane lists newest first: down is older
    assert state.layer == 1 and [r.node.path for r in state.rows] == ["/bin", "/bin/tool", "/etc", "/etc/motd"]
    state.key("k")
    state.key("\t")
    state.key("j")
    assert state.focus == "tree" and state.current is not None and state.current.path == "/etc/motd"
    assert state.status().startswith("whiteout: the layer deleted this path")
    state.key("KEY_LEFT")                       # to the parent, then close it
    assert state.current is not None and state.current.path == "/etc"
    state.key("KEY_LEFT")
    assert [r.node.path for r in state.rows][:2] == ["/etc", "/opt"]
    state.key("c")                              # the merged view up to layer 3, closed
    assert not state.changes_only and [r.node.path for r in state.rows] == ["/bin", "/etc", "/opt"]
    state.key("\n")
    assert [r.node.path for r in state.rows] == ["/bin", "/bin/tool", "/etc", "/opt"]
    assert state.title() == "merged view up to layer 3"
    assert state.key("q") is False
