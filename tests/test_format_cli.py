"""``--format`` on the command line: Go templates with docker's fields, tables and errors.

The offline tests pin what docker prints (its messages, field names, table layout) for lamina's own
store. The opt-in test runs the real docker CLI (LAMINA_DOCKER_CLI names it) against a stand-in
Engine API that serves the same store (tests/docker_api_stub.py), and compares what each prints
for the same templates: docker's formatter package is the reference.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from docker_api_stub import docker_api_stub, engine_objects
from harness import REPO_ROOT


@dataclass(frozen=True)
class Store:
    root: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lamina", "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return result.stdout


def _rootfs_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("etc/hello")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    base = tmp_path_factory.mktemp("format")
    store = Store(base / "root")
    tarball = _rootfs_tar(base / "rootfs.tar")
    store.ok("import", "-c", 'CMD ["sh", "-c", "echo hi"]', "-c", "LABEL a=b", "-m", "made <here> & now",
             str(tarball), "busybox:latest")
    store.ok("tag", "busybox:latest", "example.com/team/app:v2")
    store.ok("create", "--name", "fmt-one", "busybox", "sh", "-c", "echo hi")
    store.ok("create", "--name", "fmt-quoted", "busybox", "echo", 'say "hi"\tthere')
    yield store


def image_id(store: Store) -> str:
    return store.ok("inspect", "--format", "{{.Id}}", "busybox").strip().removeprefix("sha256:")


def test_images_repository_and_tag(store: Store) -> None:
    assert store.ok("images", "--format", "{{.Repository}}:{{.Tag}}").splitlines() == \
        ["busybox:latest", "example.com/team/app:v2"]


def test_images_table_has_docker_header_and_tabwriter_columns(store: Store) -> None:
    short = image_id(store)[:12]
    assert store.ok("images", "--format", r"table {{.ID}}\t{{.Size}}\t{{.Repository}}") == (
        "IMAGE ID       SIZE      REPOSITORY\n"
        f"{short}   6B        busybox\n"
        f"{short}   6B        example.com/team/app\n")


def test_images_json_is_one_object_per_line_with_docker_fields(store: Store) -> None:
    lines = store.ok("images", "--format", "json").splitlines()
    assert len(lines) == 2
    row = json.loads(lines[0])
    assert sorted(row) == ["Containers", "CreatedAt", "CreatedSince", "Digest", "ID", "Repository",
                           "SharedSize", "Size", "Tag", "UniqueSize", "VirtualSize"]
    assert (row["Repository"], row["Tag"], row["ID"], row["Containers"]) == \
        ("busybox", "latest", image_id(store)[:12], "N/A")


def test_unknown_field_is_one_line_as_docker_reports_it(store: Store) -> None:
    result = store.run("images", "--format", "{{.Repository}} {{.Nosuch}}")
    assert (result.returncode, result.stdout) == (1, "")  # nothing printed: every row renders first
    assert result.stderr == ('lamina: error: template parsing error: template: :1:18: executing "" '
                             "at <.Nosuch>: can't evaluate field Nosuch in type *formatter.imageContext\n")


def test_template_that_does_not_parse(store: Store) -> None:
    result = store.run("ps", "-a", "--format", "{{if .ID}}x")
    assert (result.returncode, result.stdout) == (1, "")
    # docker ps checks the format before it lists anything, with messages of its own
    assert result.stderr == "lamina: error: failed to parse template: template: :1: unexpected EOF\n"
    # docker's inspect exits 64 for a template that does not parse (cli.StatusError)
    result = store.run("inspect", "--format", "{{.Id", "busybox")
    assert (result.returncode, result.stdout) == (64, "")
    result = store.run("ps", "--format", "table {{.Nosuch}}")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ('lamina: error: failed to execute template: template: :1:8: executing "" at '
                             "<.Nosuch>: can't evaluate field Nosuch in type *formatter.ContainerContext\n")


def test_history_json_and_template(store: Store) -> None:
    result = store.run("history", "--format", "json", "busybox")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    row = json.loads(result.stdout)
    assert sorted(row) == ["Comment", "CreatedAt", "CreatedBy", "CreatedSince", "ID", "Size"]
    assert row["Comment"] == "made <here> & now"
    assert store.ok("history", "--format", "{{.ID}}|{{.Comment}}", "busybox") == \
        f"{image_id(store)[:12]}|made <here> & now\n"


def test_inspect_fields_are_docker_s(store: Store) -> None:
    assert store.ok("inspect", "--format", "{{.Config.Cmd}}|{{json .Config.Cmd}}|{{.Config.Labels.a}}|"
                    "{{.Config.Labels.zz}}|{{.Parent}}|{{len .RootFS.Layers}}", "busybox") == \
        '[sh -c echo hi]|["sh","-c","echo hi"]|b|<no value>||1\n'
    # .ID is the Go field of docker's struct, .Id its JSON name: each works alone, as in docker
    full = f"sha256:{image_id(store)}"
    assert store.ok("inspect", "--format", "{{.ID}}|", "busybox") == f"{full}|\n"
    assert store.ok("inspect", "--format", "{{.Id}}", "busybox") == f"{full}\n"
    result = store.run("inspect", "--format", "{{.Nosuch}}", "busybox")
    assert (result.returncode, result.stdout) == (1, "\n")
    assert result.stderr == ('lamina: error: template parsing error: template: :1:2: executing "" at <.Nosuch>: '
                             'map has no entry for key "Nosuch"\n')


def test_ps_fields_and_label_method(store: Store) -> None:
    assert store.ok("ps", "-a", "--filter", "name=fmt-one", "--format",
                    '{{.Names}} {{.Image}} {{.Command}} {{.State}} [{{.Label "x"}}]') \
        == "fmt-one busybox \"sh -c 'echo hi'\" created []\n"
    # docker quotes the command as Go's strconv.Quote does
    assert store.ok("ps", "-a", "--filter", "name=fmt-quoted", "--format", "{{.Command}}") == \
        '"echo \'say \\"hi\\"\\tther…"\n'
    table = store.ok("ps", "-a", "--filter", "name=fmt-one", "--format", r"table {{.Names}}\t{{.Status}}")
    assert table.splitlines() == ["NAMES     STATUS", "fmt-one   Created"]


def test_default_tables_are_unchanged(store: Store) -> None:
    """Without --format (or with a bare "table") lamina prints its own tables, as before."""
    for argv in (("images",), ("images", "--format", "table")):
        lines = store.ok(*argv).splitlines()
        assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
        assert lines[1].split()[:2] == ["busybox", "latest"] and "   latest   " in lines[1]


# --- the real docker CLI as the reference ---------------------------------------------------------

DOCKER_CLI = os.environ.get("LAMINA_DOCKER_CLI")

# (the verb's arguments before the format, after it, the templates); the templates leave out the
# relative times ("2 seconds ago"), which move between the two runs.
DOCKER_CASES: list[tuple[tuple[str, ...], tuple[str, ...], list[str]]] = [
    (("images",), (), [
        "{{.Repository}}:{{.Tag}}", "{{.ID}}", r"table {{.ID}}\t{{.Size}}",
        r"table {{.Repository}}\t{{.Tag}}\t{{.Digest}}\t{{.Size}}", "{{.Nosuch}}", "{{.ID",
        r"table {{.Repository | upper}}\t{{pad .Tag 1 1}}|", '{{.Size | printf "%10s"}}',
        '{{if eq .Tag "latest"}}L{{else}}{{.Tag}}{{end}}', "{{.CreatedAt}}",
        "{{.Containers}} {{.SharedSize}} {{.UniqueSize}} {{.VirtualSize}}", r"  {{.ID}}\n  ",
        r"table {{json .Repository}}\t{{truncate .ID 4}}\t{{split .Repository \"/\"}}", "{{json .Digest}}",
        "{{.Repository}} {{.Tag}} {{.Nosuch}}", "table {{.ID}}", "{{range $i, $x := split .Repository \"/\"}}{{$i}}{{end}}",
        # what docker's newer Go adds to the language: range over an int, else with, fmt's flags
        "{{range 3}}{{.}}{{end}}", "{{range $i, $x := 3}}{{$i}}{{end}}", '{{with ""}}{{else with .Tag}}w{{.}}{{end}}',
        '{{printf "%05s|%-05d|%x|% x|%#q" "ab" 3 "hi" "hi" "a"}}', '{{printf "%T" (split "a,b" ",")}}',
        "{{pad .Tag -1 2}}",
        # fmt and the builtins as docker's Go has them
        '{{printf "%v %.2f %e %x %g" 1e6 2.5 123456.0 255.0 1e-7}}', "{{call .ID}}", "{{call nil}}",
        '{{printf "%c|%q|%U|%#U" 9731 9731 9731 9731}}', '{{printf "%!"}}', '{{printf "%[2]d %[1]d" 1 2}}',
        '{{printf "%[3]d %d" 1 2}}', '{{printf "%[2]*[1]d|%.[2]d" 12 5}}', '{{printf "%*d|%-*d|%.*f" 5 1 4 2 2 3.14159}}',
        r'{{js "a`b<c>\"e&f=g\nh"}} {{html "a<b>&\"c"}} {{urlquery "a b/c?d=e&f+g~h"}}',
        '{{print 1 2 "a" 3 "b" "c" 4.5 true nil}}', '{{printf "%08.3f|%+05d|%-+6d|%x" -3.14159 42 42 "héllo"}}']),
    (("images", "--no-trunc"), (), ["{{.ID}}", r"table {{.ID}}\t{{.Tag}}"]),
    (("history",), ("busybox",), [
        "{{.ID}}", r"table {{.ID}}\t{{.CreatedBy}}\t{{.Size}}", "{{.CreatedAt}}", "{{.Comment}}|{{.Size}}",
        "{{.Nosuch}}", r"table {{.Comment}}\t{{.ID}}"]),
    (("history", "--no-trunc"), ("busybox",), ["{{.ID}} {{.CreatedBy}}"]),
    (("image", "inspect"), ("busybox",), [
        "{{.Id}}", "{{.ID}}", "{{.ID}} {{.Id}}", "{{.Config.Cmd}}", "{{json .Config.Cmd}}", "{{.Config.Labels}}",
        "{{.Config.Labels.a}}", "{{.Config.Labels.zz}}", "{{.Os}}/{{.Architecture}}", "{{json .RootFS}}",
        "{{.RootFS.Layers}}", "{{len .RootFS.Layers}}", "{{.Parent}}|{{.Comment}}|{{.Author}}",
        "{{range .RepoTags}}{{.}} {{end}}", "{{index .RepoTags 0}}", "{{.Size}}", "{{.Nosuch", "{{.Config.User}}",
        "{{.Config.Env}}", "{{.Config.WorkingDir}}|{{.Config.Entrypoint}}"]),
    (("ps", "-a"), (), [
        "{{.ID}} {{.Names}} {{.Image}}", r"table {{.ID}}\t{{.Command}}\t{{.Status}}\t{{.Names}}", "{{.State}}",
        "{{.Labels}}", '{{.Label "a"}}', "{{.Ports}}|{{.Mounts}}|{{.Size}}|{{.LocalVolumes}}|{{.Networks}}",
        "{{.Nosuch}}", "{{.CreatedAt}}", r"table {{.Label \"com.example.my-label\"}}\t{{.Names}}",
        r'table {{.Label "com.example.my-label"}}\t{{.Names}}',
        "{{.Platform}}|{{json .Platform}}|{{if .Platform}}y{{else}}n{{end}}", "{{.HealthStatus}}",
        r"table {{.Names}}\t{{.Platform}}"]),
    (("ps", "-a", "--no-trunc"), (), ["{{.ID}} {{.Command}}"]),
    (("container", "inspect"), ("fmt-one",), [
        "{{.State.Status}} {{.State.Running}} {{.State.Pid}} {{.State.ExitCode}}", "{{.Name}}", "{{.ID}}|{{.Id}}",
        "{{.Config.Cmd}}", "{{json .Config.Env}}", "{{.HostConfig.NetworkMode}}", "{{.Nosuch}}",
        "{{range .Mounts}}{{.Destination}}{{end}}", "{{.Path}} {{.Args}}", "{{.RestartCount}}", "{{.Config.Labels.x}}",
        "{{.HostConfig.PortBindings}}", "{{.State.Error}}|{{.State.StartedAt}}|{{.Config.Tty}}", "{{.Config.Hostname}}",
        "{{.GraphDriver.Name}}", "{{.Image}}"]),
]


def _rows(stdout: str, template: str) -> list[str]:
    """The lines printed, in order but for the rows of one image's names, which docker lists in
    Go's map order (random): those are sorted, below a table's header."""
    lines = stdout.split("\n")
    head = 1 if template.startswith("table") else 0
    return lines[:head] + sorted(lines[head:])


def _message(stderr: str, prefix: str) -> str:
    lines = [line.removeprefix(prefix) for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.skipif(not DOCKER_CLI, reason="outside reference: set LAMINA_DOCKER_CLI to a docker CLI binary")
def test_docker_cli_prints_the_same(store: Store, tmp_path: Path) -> None:
    assert DOCKER_CLI is not None
    differences = []
    with docker_api_stub(tmp_path / "docker.sock", engine_objects(store.root)) as host:
        env = {**os.environ, "DOCKER_HOST": host, "DOCKER_CONFIG": str(tmp_path / "docker-config")}
        for before, after, templates in DOCKER_CASES:
            for template in templates:
                docker = subprocess.run([DOCKER_CLI, *before, "--format", template, *after], capture_output=True,
                                        text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
                verb = before[1:] if before[0] in ("image", "container") else before
                ours = store.run(*verb, "--format", template, *after)
                want = (_rows(docker.stdout, template), docker.returncode == 0, _message(docker.stderr, ""))
                got = (_rows(ours.stdout, template), ours.returncode == 0, _message(ours.stderr, "lamina: error: "))
                if got != want:
                    differences.append((before, template, want, got))
    assert not differences, "\n".join(repr(d) for d in differences)


# --- podman, whose --format runs the same template engine ------------------------------------------

PODMAN = shutil.which("podman")

# Templates on which podman and docker agree (podman names and tables differ from docker's by design:
# "localhost/busybox", two spaces between columns).
PODMAN_TEMPLATES = [
    "{{.ID}}", "{{.Tag}}", '{{printf "%.4s|%-8s|" .ID .Tag}}', '{{if eq .Tag "latest"}}L{{else}}other{{end}}',
    "{{len .ID}}", "{{.ID | upper}}", '{{range $i, $c := split .ID "a"}}{{$i}}{{end}}', "{{.Nosuch}}",
    "{{.Tag", '{{index (split .ID "") 0}}{{slice .Tag 1 3}}',
]


@pytest.mark.skipif(PODMAN is None or os.geteuid() != 0, reason="needs podman, and root for its own store")
def test_podman_agrees_on_the_template_language(store: Store, tmp_path: Path) -> None:
    assert PODMAN is not None
    archive = tmp_path / "busybox.tar"
    store.ok("save", "-o", str(archive), "busybox:latest")
    runroot = Path(tempfile.mkdtemp(prefix="lamina-fmt-"))  # podman refuses a runroot over 50 characters
    podman = [PODMAN, "--root", str(tmp_path / "podman-root"), "--runroot", str(runroot), "--storage-driver", "vfs"]
    try:
        differences = _podman_differences(store, podman, archive)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
    assert not differences, "\n".join(repr(d) for d in differences)


def _podman_differences(store: Store, podman: list[str], archive: Path) -> list[tuple[object, ...]]:
    loaded = subprocess.run([*podman, "load", "-i", str(archive)], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    differences = []
    for template in PODMAN_TEMPLATES:
        theirs = subprocess.run([*podman, "images", "--format", template, "busybox"], capture_output=True,
                                text=True, timeout=60)
        ours = store.run("images", "--format", template, "busybox")
        # podman exits 125 for a template error where docker's client exits 1: compare failure, not code
        if (ours.stdout, ours.returncode == 0) != (theirs.stdout, theirs.returncode == 0):
            differences.append((template, theirs.stdout, theirs.returncode, ours.stdout, ours.returncode))
    return differences
