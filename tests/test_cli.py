"""The ``lamina`` entry point: lazy verb dispatch, global flags, docker's error conventions."""

from __future__ import annotations

import importlib

from lamina.argv import requested_verb
from lamina.cli import ALL_COMMAND_MODULES, VERB_MODULES, LaminaArgumentParser


def test_verb_table_matches_what_each_module_registers() -> None:
    for module_name in ALL_COMMAND_MODULES:
        parser = LaminaArgumentParser(prog="lamina")
        subparsers = parser.add_subparsers(dest="command", parser_class=LaminaArgumentParser)
        importlib.import_module(module_name).register(subparsers)
        registered = set(subparsers.choices)
        listed = {verb for verb, owner in VERB_MODULES.items() if owner == module_name}
        assert registered == listed, module_name


def test_requested_verb_skips_global_options() -> None:
    assert requested_verb(["--root", "/x", "--log-level", "debug", "run", "--rm", "img"]) == "run"
    assert requested_verb(["--root=/x", "images"]) == "images"
    assert requested_verb(["--version"]) is None


def test_help_lists_every_verb(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    out = lamina_cmd("--help").stdout
    for verb in ("build", "run", "images", "pull", "mount", "which"):
        assert verb in out


def test_unknown_verb_exits_1_as_docker(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    """docker's client: "docker: 'frobnicate' is not a docker command." and exit 1 (podman: 125)."""
    for argv in (["frobnicate"], ["image", "frobnicate"]):
        result = lamina_cmd(*argv, check=False)
        assert result.returncode == 1, argv
        assert "'frobnicate' is not a lamina" in result.stderr and result.stderr.startswith("lamina: error:")


def test_lamina_error_is_one_line_without_traceback(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    result = lamina_cmd("inspect", "no-such-image-anywhere", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_libraries_know_nothing_of_the_command_line() -> None:
    """The store, inspector, builder and runner are libraries: flags are parsed in lamina.commands."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    libraries = [repo / "lamina" / "store", repo / "lamina" / "inspector", repo / "builder", repo / "runner"]
    offenders = []
    for path in sorted(p for library in libraries for p in library.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "argparse" or n.startswith(("lamina.commands", "lamina.cli")) for n in names):
                offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert offenders == []


# One command line per verb, with flags of every kind (store_true, append, choices, typed values,
# REMAINDER, nested sub-verbs).
SAMPLE_COMMAND_LINES: dict[str, list[str]] = {
    "history": ["history", "--no-trunc", "-q", "--format", "json", "img"],
    "images": ["images", "-q", "--no-trunc", "--digests", "-f", "dangling=true", "--format", "{{.ID}}", "busybox"],
    "import": ["import", "-c", "CMD sh", "-c", "ENV A=1", "-m", "msg", "-", "new:tag"],
    "inspect": ["inspect", "-f", "{{.Id}}", "--type", "image", "a", "b"],
    "load": ["load", "-i", "archive.tar", "-q"],
    "rmi": ["rmi", "-f", "a", "b"],
    "save": ["save", "-o", "out.tar", "--format", "oci-archive", "a"],
    "image prune": ["image", "prune", "-a", "-f"],
    "system df": ["system", "df", "--format", "json"],
    "system prune": ["system", "prune", "-a", "-f"],
    "system check": ["system", "check", "--quick"],
    "builder prune": ["builder", "prune", "-a", "-f"],
    "container prune": ["container", "prune", "-f"],
    "version": ["version", "-f", "{{json .}}"],
    "info": ["info", "--format", "{{.Driver}}"],
    "tag": ["tag", "a", "b", "c"],
    "login": ["login", "-u", "user", "--password-stdin", "--tls-verify=false", "registry.test"],
    "logout": ["logout", "registry.test"],
    "pull": ["pull", "--platform", "linux/arm64/v8", "--tls-verify", "false", "-q", "img"],
    "push": ["push", "--creds", "u:p", "--cert-dir", "/certs", "img", "registry.test/img:1"],
    "build": ["build", "-t", "a", "-t", "b", "--build-arg", "A=1", "--no-cache", "-f", "-", "ctx"],
    "commit": ["commit", "-m", "msg", "--pause=false", "-c", "CMD x", "-a", "me", "ctr", "img:1"],
    "create": ["create", "--name", "c", "-e", "A=1", "-v", "/x", "--read-only", "img", "sh", "-c", "x"],
    "diff": ["diff", "ctr"],
    "cp": ["cp", "-a", "-L", "ctr:/etc/passwd", "-"],
    "export": ["export", "-o", "out.tar", "ctr"],
    "attach": ["attach", "--detach-keys", "ctrl-a,x", "--no-stdin", "ctr"],
    "top": ["top", "ctr", "-o", "pid,comm"],
    "rename": ["rename", "ctr", "new"],
    "pause": ["pause", "a", "b"],
    "unpause": ["unpause", "a"],
    "exec": ["exec", "-it", "-e", "A=1", "ctr", "ls", "-l"],
    "kill": ["kill", "-s", "TERM", "a", "b"],
    "logs": ["logs", "-f", "-t", "--since", "10m", "-n", "5", "ctr"],
    "port": ["port", "ctr"],
    "ps": ["ps", "-a", "-q", "-f", "name=x", "-n", "3", "-l", "-s", "--no-trunc", "--format", "json"],
    "restart": ["restart", "-t", "3", "a"],
    "rm": ["rm", "-f", "a", "b"],
    "run": ["run", "--rm", "-d", "-p", "8080:80", "--network", "none", "--entrypoint", "", "img", "true"],
    "start": ["start", "-a", "ctr"],
    "stop": ["stop", "-t", "0", "a"],
    "wait": ["wait", "a", "b"],
    "layers": ["layers", "--json", "img"],
    "mount": ["mount", "--rw", "--upto", "2", "--trace", "/t", "img", "/mnt"],
    "umount": ["umount", "--lazy", "/mnt"],
    "which": ["which", "--json", "img", "/etc/passwd"],
    "volume": ["volume", "ls", "-q", "--filter", "dangling=true"],
}


def _parsed(argv: list[str]) -> dict[str, object]:
    from lamina.cli import build_parser

    return vars(build_parser(argv).parse_args(argv))


def _usage_error(argv: list[str]) -> str:
    import pytest

    from lamina.cli import build_parser
    from lamina.errors import UsageError

    with pytest.raises(UsageError) as raised:
        build_parser(argv).parse_args(argv)
    return str(raised.value)


def test_every_verb_parses_alike_with_start_up_tricks_on_and_off(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lamina.cli import build_parser

    assert set(SAMPLE_COMMAND_LINES) == set(VERB_MODULES)
    full = build_parser(())  # no verb named: every module registers every verb
    for verb, argv in SAMPLE_COMMAND_LINES.items():
        expected = vars(full.parse_args(argv))
        bad = [*verb.split(" "), "--no-such-flag"]
        monkeypatch.delenv("LAMINA_NO_PATCHES", raising=False)
        with_tricks, error_with_tricks = _parsed(argv), _usage_error(bad)
        monkeypatch.setenv("LAMINA_NO_PATCHES", "1")
        without_tricks, error_without_tricks = _parsed(argv), _usage_error(bad)
        assert with_tricks == expected == without_tricks, verb
        assert error_with_tricks == error_without_tricks, verb


def test_the_one_verb_parser_is_used_only_with_start_up_tricks_on(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lamina.cli import build_parser

    def verbs_built(argv: list[str]) -> set[str]:
        action = build_parser(argv)._subparsers._group_actions[0]  # type: ignore[union-attr]
        return set(action.choices)  # type: ignore[arg-type]

    def sub_verbs_built(argv: list[str]) -> set[str]:
        action = build_parser(argv)._subparsers._group_actions[0]  # type: ignore[union-attr]
        group = action.choices[argv[0]]  # type: ignore[index]
        return set(group._subparsers._group_actions[0].choices)  # type: ignore[union-attr]

    from lamina.commands import group_verbs

    monkeypatch.delenv("LAMINA_NO_PATCHES", raising=False)
    assert verbs_built(["ps"]) == {"ps"}
    assert verbs_built(["image", "ls"]) == {"image"} and sub_verbs_built(["image", "ls"]) == {"ls", "list"}
    monkeypatch.setenv("LAMINA_NO_PATCHES", "1")
    assert verbs_built(["ps"]) == {v for v, m in VERB_MODULES.items() if m == VERB_MODULES["ps"] and " " not in v}
    images_module = VERB_MODULES["images"]
    assert sub_verbs_built(["image", "ls"]) == {sub for sub, verb in group_verbs("image").items()
                                                if VERB_MODULES[verb] == images_module}


def test_archive_formats_offered_are_those_the_archive_module_writes() -> None:
    from lamina.commands.images import ARCHIVE_FORMATS
    from lamina.store.archive import DOCKER_ARCHIVE, OCI_ARCHIVE

    assert ARCHIVE_FORMATS == (DOCKER_ARCHIVE, OCI_ARCHIVE)


def test_every_group_sub_verb_parses_as_its_verb(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``lamina GROUP SUB ARGS`` is ``lamina VERB ARGS`` (plus what the group implies), with start-up
    tricks on and off; every group's help lists its sub-verbs."""
    from lamina.commands import GROUP_DEFAULTS, group_verbs, groups, is_top_level

    assert {"image", "container", "system", "builder"} <= set(groups())
    for tricks in ("", "1"):
        monkeypatch.setenv("LAMINA_NO_PATCHES", tricks)
        for group in groups():
            for sub, verb in group_verbs(group).items():
                if not is_top_level(verb):
                    continue  # a verb of its group alone: parsed in SAMPLE_COMMAND_LINES
                args = SAMPLE_COMMAND_LINES[verb][1:]
                expected = _parsed([verb, *args])
                for key, value in GROUP_DEFAULTS.get((group, sub), {}).items():
                    if expected[key] is None:  # the group's default, unless the flag was given
                        expected[key] = value
                parsed = _parsed([group, sub, *args])
                assert parsed.pop("subcommand") == sub and parsed.pop("verb_or_group") == group, (group, sub)
                expected.pop("verb_or_group")
                assert parsed == expected, (group, sub)


def test_group_help_and_no_sub_verb(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    """docker prints a group's help (on stderr) and exits 0 when no sub-verb is given."""
    listing = lamina_cmd("image", "--help")
    assert listing.returncode == 0 and "ls (list)" in listing.stdout and "prune" in listing.stdout
    bare = lamina_cmd("container")
    assert bare.returncode == 0 and "prune" in bare.stderr and bare.stdout == ""


def test_help_on_every_verb_and_group_exits_0(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from lamina.cli import build_parser
    from lamina.commands import groups

    lines = [verb.split(" ") for verb in VERB_MODULES] + [[group] for group in groups()] + [[]]
    for tricks in ("", "1"):
        monkeypatch.setenv("LAMINA_NO_PATCHES", tricks)
        for words in lines:
            argv = [*words, "--help"]
            with pytest.raises(SystemExit) as done:
                build_parser(argv).parse_args(argv)
            assert done.value.code == 0, argv
            assert capsys.readouterr().out.startswith(f"usage: {' '.join(['lamina', *words])}"), argv


def test_booleans_take_go_values_and_never_the_next_word() -> None:
    """pflag's booleans: ``--rm=false``, ``-d=0``, ``--tty=True``; a bare flag takes no value."""
    from lamina.cli import build_parser
    from lamina.errors import UsageError

    def run_args(*argv: str) -> dict[str, object]:
        return _parsed(["run", *argv])

    parsed = run_args("--rm=true", "-d=false", "--tty=True", "-i=0", "img", "echo", "--rm=maybe")
    assert (parsed["rm"], parsed["detach"], parsed["tty"], parsed["interactive"]) == (True, False, True, False)
    assert parsed["command"] == ["echo", "--rm=maybe"]  # after the image: the command's own
    parsed = run_args("--rm", "img")
    assert (parsed["rm"], parsed["image"]) == (True, "img")
    parsed = run_args("-it", "--rm=f", "img")
    assert (parsed["interactive"], parsed["tty"], parsed["rm"]) == (True, True, False)
    assert _parsed(["ps", "-a=false"])["all"] is False and _parsed(["images", "--no-trunc=1"])["no_trunc"] is True
    assert _parsed(["commit", "--pause=false", "c"])["pause"] is False
    assert _parsed(["commit", "c"])["pause"] is True
    # a default-true boolean takes no value either: the next word is the container, as docker's
    assert (_parsed(["commit", "--pause", "c"])["pause"], _parsed(["commit", "--pause", "c"])["container"]) == (True, "c")
    assert _parsed(["commit", "-p=F", "c"])["pause"] is False and _parsed(["attach", "--sig-proxy=false", "c"])["sig_proxy"] is False
    for bad in (["run", "--rm=maybe", "img"], ["ps", "--all="]):
        try:
            build_parser(bad).parse_args(bad)
        except UsageError as e:
            assert "invalid boolean value" in str(e)
        else:
            raise AssertionError(bad)
