"""Pass 2 of the Dockerfile parser: one class per instruction, the grammar kept as data.

Each :class:`Instruction` subclass declares its keyword and the flags it allows, parses its arguments
in ``__init__`` (exec/JSON or shell form, ``key=value`` pairs, ...) and then follows the life cycle
described in :mod:`builder.dockerfile`: ``expand`` -> ``cache_text`` -> (the builder executes it) ->
``update_config``. :data:`GRAMMAR` maps each keyword to its class.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from builder.lines import HEREDOC_WORD_RE, Heredoc, LogicalLine
from builder.shellwords import Lexer, SubstitutionError, split_words
from builder.values import parse_duration, parse_mount, parse_ports, signal_ok
from lamina.errors import DockerfileError

DEFAULT_SHELL = ["/bin/sh", "-c"]
# The PATH docker's builders give a stage whose base image sets none (BuildKit's
# system.DefaultPathEnv for linux): written into the stage's config, so it is in scope for
# variable expansion, in RUN's environment and in the image built.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_ENV_NAME_RE = re.compile(r"^[^=\s]+$")


class Scope(Protocol):
    """What :meth:`Instruction.expand` needs from the builder."""

    lexer: Lexer

    def variables(self) -> Mapping[str, str]:
        """The variables visible to this instruction: declared ARGs with a value, then ENV."""
        ...


@dataclass
class Flags:
    values: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        found = self.values.get(name)
        return found[-1] if found else None

    def all(self, name: str) -> list[str]:
        return self.values.get(name, [])

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        return value is not None and value.lower() in ("", "true", "1")


class Instruction:
    """One Dockerfile instruction. Subclasses declare their keyword, their flags and how they parse.

    ``string_flags`` take ``--name=value`` (``multi_flags`` may repeat), ``bool_flags`` take ``--name``
    or ``--name=true|false``. ``expands`` says whether variables are substituted in the arguments
    (docker does it for ENV, LABEL, COPY, ADD, FROM, WORKDIR, USER, EXPOSE, VOLUME, STOPSIGNAL, ARG,
    never for RUN, CMD, ENTRYPOINT, SHELL, whose words belong to the shell at run time).
    """

    keyword: ClassVar[str] = ""
    string_flags: ClassVar[tuple[str, ...]] = ()
    multi_flags: ClassVar[tuple[str, ...]] = ()
    bool_flags: ClassVar[tuple[str, ...]] = ()
    makes_layer: ClassVar[bool] = False

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        self.line = line.line
        self.text = line.text
        self.file = file
        self.escape = escape
        self.heredocs = line.heredocs
        self.flags, self.args = self._take_flags(line.args)

    # --- errors and helpers
    def error(self, message: str) -> DockerfileError:
        return DockerfileError(message, self.file, self.line, self.text)

    def _take_flags(self, args: str) -> tuple[Flags, str]:
        flags = Flags()
        rest = args
        while rest.startswith("--"):
            word, _, remainder = rest.partition(" ")
            if "\t" in word:
                word, _, more = word.partition("\t")
                remainder = more + " " + remainder
            if word == "--":
                rest = remainder.strip()
                break
            name, has_value, value = word[2:].partition("=")
            if name in self.bool_flags:
                if has_value and value.lower() not in ("true", "false", "1", "0"):
                    raise self.error(f"expecting boolean value for flag {name}, not: {value}")
                flags.values.setdefault(name, []).append(value if has_value else "true")
            elif name in self.string_flags or name in self.multi_flags:
                if not has_value:
                    raise self.error(f"missing a value on flag: --{name}")
                if name in self.string_flags and name in flags.values and name not in self.multi_flags:
                    raise self.error(f"duplicate flag specified: --{name}")
                flags.values.setdefault(name, []).append(_unquote_flag(value))
            else:
                raise self.error(f"unknown flag: --{name}")
            rest = remainder.strip()
        return flags, rest

    def _exec_or_shell(self) -> tuple[list[str] | None, str]:
        """(exec-form argv, "") for a JSON array of strings, else (None, shell command)."""
        args = self.args
        if args.startswith("["):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
                return parsed, ""
        return None, args

    def _expand(self, scope: Scope, text: str) -> str:
        try:
            return scope.lexer.process_word(text, scope.variables())
        except SubstitutionError as e:
            raise self.error(str(e)) from None

    def _expand_words(self, scope: Scope, text: str) -> list[str]:
        try:
            return scope.lexer.process_words(text, scope.variables())
        except SubstitutionError as e:
            raise self.error(str(e)) from None

    # --- life cycle (defaults: metadata-only, nothing to substitute)
    def expand(self, scope: Scope) -> None:
        """Substitute variables from ``scope`` into this instruction's arguments."""

    def cache_text(self) -> str:
        """The instruction after substitution: what the cache key and the history record."""
        return f"{self.keyword} {self.args}".strip()

    def update_config(self, image: ImageConfig) -> None:
        """Apply this instruction to the image config being built."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} line {self.line}: {self.text!r}>"


def _unquote_flag(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
        return value[1:-1]
    return value


@dataclass
class ImageConfig:
    """The parts of an OCI image config an instruction may change, plus stage-local build state."""

    config: dict[str, Any] = field(default_factory=dict)  # the OCI "config" object
    author: str | None = None
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set_in_stage: bool = False

    # --- views used by the builder
    def env(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for item in self.config.get("Env") or []:
            key, _, value = item.partition("=")
            result[key] = value
        return result

    def ensure_path(self) -> None:
        """Give the config docker's default PATH when it has none (BuildKit does this for every
        stage, ``FROM scratch`` included, before the first instruction)."""
        if "PATH" not in self.env():
            self.config["Env"] = [*(self.config.get("Env") or []), f"PATH={DEFAULT_PATH}"]

    def set_env(self, key: str, value: str) -> None:
        env = [e for e in (self.config.get("Env") or []) if e.partition("=")[0] != key]
        env.append(f"{key}={value}")
        self.config["Env"] = env

    @property
    def workdir(self) -> str:
        return self.config.get("WorkingDir") or "/"

    @property
    def user(self) -> str:
        return self.config.get("User") or ""

    def with_shell(self, command: str) -> list[str]:
        return [*self.shell, command]


class From(Instruction):
    keyword = "FROM"
    string_flags = ("platform",)

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        words = self.args.split()
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
            raise self.error("FROM requires either one or three arguments: FROM <image> [AS <name>]")
        self.image_text = words[0]
        self.name: str | None = None
        if len(words) == 3:
            name = words[2]
            if not _STAGE_NAME_RE.match(name.lower()):
                raise self.error(f"invalid name for build stage: {name!r}, name can't start with a number "
                                 "or contain symbols")
            self.name = name.lower()
        self.image = self.image_text
        self.platform = self.flags.get("platform")

    def expand(self, scope: Scope) -> None:
        self.image = self._expand(scope, self.image_text)
        if not self.image:
            raise self.error(f"base name ({self.image_text}) should not be blank")
        if self.platform is not None:
            self.platform = self._expand(scope, self.platform)

    def cache_text(self) -> str:
        return f"FROM {self.image}" + (f" AS {self.name}" if self.name else "")


class Run(Instruction):
    keyword = "RUN"
    string_flags = ("network", "security")
    multi_flags = ("mount",)
    makes_layer = True

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        if not self.args:
            raise self.error("RUN requires at least one argument")
        self.exec_form, self.command = self._exec_or_shell()
        if self.heredocs and self.exec_form is not None:
            raise self.error("heredocs are only supported in the shell form of RUN")
        network = self.flags.get("network")
        if network is not None and network not in ("default", "none", "host"):
            raise self.error(f"unsupported network mode {network!r} (expected default, none or host)")
        self.network = network or "default"
        security = self.flags.get("security")
        if security not in (None, "sandbox"):
            raise self.error(f"--security={security} is not supported by lamina")
        self.mounts = [parse_mount(spec, self.error) for spec in self.flags.all("mount")]
        agents = [m for m in self.mounts if m.type == "ssh"]
        for number, agent in enumerate(agents):
            # BuildKit's llb: the Nth ssh mount without a target is /run/buildkit/ssh_agent.N.
            agent.target = agent.target or f"/run/buildkit/ssh_agent.{number}"
        self.argv: list[str] = []
        self.script: Heredoc | None = None  # a single heredoc starting with #!: run as a file

    def expand(self, scope: Scope) -> None:
        # Only the mount specifications are substituted; the command belongs to the shell.
        expanded = []
        for mount in self.mounts:
            for attr in ("target", "source", "from_", "id", "env"):
                value = getattr(mount, attr)
                if value is not None:
                    setattr(mount, attr, self._expand(scope, value))
            expanded.append(mount)
        self.mounts = expanded

    def resolve_argv(self, image: ImageConfig) -> list[str]:
        """The argv to execute, given the stage's SHELL (docker's heredoc rules for RUN)."""
        if self.exec_form is not None:
            self.argv = list(self.exec_form)
            return self.argv
        if self.heredocs:
            only = HEREDOC_WORD_RE.match(self.command.strip())
            if len(self.heredocs) == 1 and only and " " not in self.command.strip():
                doc = self.heredocs[0]
                if doc.body.startswith("#!"):
                    self.script = doc
                    self.argv = [f"/dev/pipes/{doc.name}"]
                    return self.argv
                self.argv = image.with_shell(doc.body)
                return self.argv
            # Anything else: hand the command and the heredocs to the shell, which does its own
            # heredoc processing (so <<- and quoted delimiters keep their shell meaning).
            full = self.command
            for doc in self.heredocs:
                full += "\n" + doc.raw_body + doc.name
            self.argv = image.with_shell(full)
            return self.argv
        self.argv = image.with_shell(self.command)
        return self.argv

    def cache_text(self) -> str:
        # Secrets and agents by name and place only: BuildKit keeps their content out of the key.
        mounts = " ".join(f"--mount={m}" + (f"(env={m.env!r},required={m.required})"
                                             if m.type in ("secret", "ssh") else "")
                          for m in self.mounts)
        network = f"--network={self.network} " if self.network != "default" else ""
        body = json.dumps(self.argv) if self.argv else self.args
        heredocs = "".join(f"\n{d.name}:{d.raw_body}" for d in self.heredocs)
        return f"RUN {network}{mounts} {body}{heredocs}"


class _CommandInstruction(Instruction):
    """CMD and ENTRYPOINT: exec form kept as is, shell form wrapped in the stage's SHELL."""

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        self.exec_form, self.command = self._exec_or_shell()
        self.argv: list[str] = []

    def resolve(self, image: ImageConfig) -> list[str]:
        if self.exec_form is not None:
            return list(self.exec_form)
        if not self.command:
            return []
        return image.with_shell(self.command)

    def cache_text(self) -> str:
        return f"{self.keyword} {json.dumps(self.argv)}"


class Cmd(_CommandInstruction):
    keyword = "CMD"

    def update_config(self, image: ImageConfig) -> None:
        self.argv = self.resolve(image)
        image.config["Cmd"] = self.argv or None
        image.cmd_set_in_stage = True


class Entrypoint(_CommandInstruction):
    keyword = "ENTRYPOINT"

    def update_config(self, image: ImageConfig) -> None:
        self.argv = self.resolve(image)
        image.config["Entrypoint"] = self.argv or None
        if not image.cmd_set_in_stage:
            # A CMD inherited from the base makes no sense with a new ENTRYPOINT (docker resets it).
            image.config["Cmd"] = None


def parse_name_values(inst: Instruction, keyword: str) -> list[tuple[str, str]]:
    """docker's parseNameVal: ``k=v k2="v 2"`` or the legacy ``key value with spaces`` form."""
    words = split_words(inst.args, inst.escape)
    if not words:
        raise inst.error(f"{keyword} requires at least one argument")
    if "=" not in words[0]:
        parts = inst.args.split(None, 1)
        if len(parts) < 2:
            raise inst.error(f"{keyword} must have two arguments")
        return [(parts[0], parts[1])]
    pairs = []
    for word in words:
        if "=" not in word:
            raise inst.error(f"syntax error - can't find = in {word!r}. Must be of the form: name=value")
        key, _, value = word.partition("=")
        if not key:
            raise inst.error(f"{keyword} names can not be blank")
        pairs.append((key, value))
    return pairs


class Env(Instruction):
    keyword = "ENV"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        self.raw_pairs = parse_name_values(self, "ENV")
        self.pairs: list[tuple[str, str]] = []

    def expand(self, scope: Scope) -> None:
        # Each pair sees the variables as they were before this instruction (docker's rule).
        self.pairs = [(self._expand(scope, k), self._expand(scope, v)) for k, v in self.raw_pairs]
        for key, _ in self.pairs:
            if not _ENV_NAME_RE.match(key):
                raise self.error(f"invalid environment variable name {key!r}")

    def update_config(self, image: ImageConfig) -> None:
        for key, value in self.pairs:
            image.set_env(key, value)

    def cache_text(self) -> str:
        return "ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in self.pairs)


class Label(Instruction):
    keyword = "LABEL"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        self.raw_pairs = parse_name_values(self, "LABEL")
        self.pairs: list[tuple[str, str]] = []

    def expand(self, scope: Scope) -> None:
        self.pairs = [(self._expand(scope, k), self._expand(scope, v)) for k, v in self.raw_pairs]

    def update_config(self, image: ImageConfig) -> None:
        labels = dict(image.config.get("Labels") or {})
        labels.update(self.pairs)
        image.config["Labels"] = labels

    def cache_text(self) -> str:
        return "LABEL " + " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in self.pairs)


class Maintainer(Instruction):
    keyword = "MAINTAINER"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        if not self.args:
            raise self.error("MAINTAINER requires exactly one argument")

    def update_config(self, image: ImageConfig) -> None:
        image.author = self.args


class Expose(Instruction):
    keyword = "EXPOSE"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        if not self.args:
            raise self.error("EXPOSE requires at least one argument")
        self.ports: list[str] = []

    def expand(self, scope: Scope) -> None:
        ports = []
        for word in self._expand_words(scope, self.args):
            try:
                ports.extend(parse_ports(word))
            except ValueError:
                raise self.error(f"invalid port specification: {word!r}") from None
        self.ports = ports

    def update_config(self, image: ImageConfig) -> None:
        exposed = dict(image.config.get("ExposedPorts") or {})
        for port in self.ports:
            exposed[port] = {}
        image.config["ExposedPorts"] = exposed

    def cache_text(self) -> str:
        return "EXPOSE " + " ".join(self.ports)


def _json_or_words(inst: Instruction) -> tuple[list[str], bool]:
    """(items, is_json) for instructions taking a JSON array or whitespace-separated words."""
    if inst.args.startswith("["):
        try:
            parsed = json.loads(inst.args)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
            return parsed, True
    return split_words(inst.args, inst.escape), False


class _CopyLike(Instruction):
    """COPY and ADD: sources (context paths, heredocs, URLs for ADD) and a destination."""

    makes_layer = True

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        items, self.is_json = _json_or_words(self)
        if len(items) < 2:
            raise self.error(f"{self.keyword} requires at least two arguments, but only "
                             f"{len(items)} {'was' if len(items) == 1 else 'were'} provided. "
                             "Destination could not be determined.")
        self.raw_sources = items[:-1]
        self.raw_dest = items[-1]
        self.sources: list[str] = []
        self.dest = ""
        self.chown = self.flags.get("chown")
        self.chmod = self.flags.get("chmod")
        self.excludes = self.flags.all("exclude")
        self.heredoc_by_name = {doc.name: doc for doc in self.heredocs}
        if self.excludes:
            # Refused rather than ignored: silently copying excluded files would be worse.
            raise self.error(f"{self.keyword} --exclude is not supported by lamina (use .dockerignore)")
        self.content_digest = ""  # set by the builder: hash of the sources' content and metadata

    def heredoc_for(self, source: str) -> Heredoc | None:
        m = HEREDOC_WORD_RE.match(source)
        if not m:
            return None
        name = m.group(3).strip("'\"")
        return self.heredoc_by_name.get(name)

    def expand(self, scope: Scope) -> None:
        def one(word: str) -> str:
            if self.is_json:
                # JSON form: no quote processing, but variables are still substituted.
                try:
                    return scope.lexer.process_word(word.replace('"', '\\"').replace("'", "\\'"),
                                                    scope.variables())
                except SubstitutionError as e:
                    raise self.error(str(e)) from None
            return self._expand(scope, word)

        self.sources = [src if self.heredoc_for(src) else one(src) for src in self.raw_sources]
        self.dest = one(self.raw_dest)
        if not self.dest:
            raise self.error(f"{self.keyword}: destination can not be empty")
        if self.chown is not None:
            self.chown = self._expand(scope, self.chown)
        if self.chmod is not None:
            self.chmod = self._expand(scope, self.chmod)
            if not re.fullmatch(r"[0-7]{3,4}", self.chmod):
                raise self.error(f"invalid --chmod={self.chmod}: only octal modes are supported")
        self.excludes = [self._expand(scope, e) for e in self.excludes]
        for doc in self.heredocs:
            if doc.expand:
                doc.body = _expand_heredoc(scope, doc.body)

    def cache_text(self) -> str:
        flags = "".join(f"--{k}={','.join(v)} " for k, v in sorted(self.flags.values.items()))
        docs = "".join(f"\n{d.name}:{d.body}" for d in self.heredocs)
        return (f"{self.keyword} {flags}{json.dumps(self.sources)} {json.dumps(self.dest)}"
                f" content={self.content_digest}{docs}")


def _expand_heredoc(scope: Scope, body: str) -> str:
    # Only variables are substituted in a heredoc body: its quotes are content (BuildKit's
    # SkipProcessQuotes). We escape the quote characters so the lexer keeps them.
    escape = scope.lexer.escape
    protected = body.replace(escape, escape + escape).replace("'", escape + "'").replace('"', escape + '"')
    # An escaped dollar in the body stays a literal dollar.
    protected = protected.replace(escape + escape + "$", escape + "$")
    try:
        return scope.lexer.process_word(protected, scope.variables())
    except SubstitutionError as e:
        raise DockerfileError(f"in heredoc: {e}") from None


class Copy(_CopyLike):
    keyword = "COPY"
    string_flags = ("from", "chown", "chmod")
    multi_flags = ("exclude",)
    bool_flags = ("link", "parents")

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        self.from_stage = self.flags.get("from")

    def expand(self, scope: Scope) -> None:
        super().expand(scope)
        if self.from_stage is not None:
            self.from_stage = self._expand(scope, self.from_stage)


class Add(_CopyLike):
    keyword = "ADD"
    string_flags = ("chown", "chmod", "checksum")
    multi_flags = ("exclude",)
    bool_flags = ("link", "keep-git-dir")

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        self.checksum = self.flags.get("checksum")
        if self.checksum is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", self.checksum):
            raise self.error(f"invalid --checksum={self.checksum}: expected sha256:<64 hex digits>")

    def expand(self, scope: Scope) -> None:
        super().expand(scope)
        if self.checksum is not None and not all(is_url(s) for s in self.sources):
            raise self.error("--checksum can only be used with HTTP(S) sources")
        for source in self.sources:
            if source.startswith(("git@", "git://")) or (is_url(source) and source.split("#")[0].endswith(".git")):
                raise self.error(f"ADD of a git repository is not supported by lamina: {source}")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class Volume(Instruction):
    keyword = "VOLUME"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        self.raw_items, self.is_json = _json_or_words(self)
        if not self.raw_items:
            raise self.error("VOLUME requires at least one argument")
        self.volumes: list[str] = []

    def expand(self, scope: Scope) -> None:
        self.volumes = [self._expand(scope, v) if not self.is_json else v for v in self.raw_items]
        for v in self.volumes:
            if not v.strip():
                raise self.error("VOLUME specified can not be an empty string")

    def update_config(self, image: ImageConfig) -> None:
        volumes = dict(image.config.get("Volumes") or {})
        for v in self.volumes:
            volumes[v] = {}
        image.config["Volumes"] = volumes

    def cache_text(self) -> str:
        return "VOLUME " + json.dumps(self.volumes)


class User(Instruction):
    keyword = "USER"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        if not self.args or len(split_words(self.args, escape)) != 1:
            raise self.error("USER requires exactly one argument")
        self.user = ""

    def expand(self, scope: Scope) -> None:
        self.user = self._expand(scope, self.args)
        if not self.user:
            raise self.error("USER requires a non-empty user name or id")

    def update_config(self, image: ImageConfig) -> None:
        image.config["User"] = self.user

    def cache_text(self) -> str:
        return f"USER {self.user}"


class Workdir(Instruction):
    keyword = "WORKDIR"
    makes_layer = True  # only when the directory does not exist yet; the builder decides

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        if not self.args:
            raise self.error("WORKDIR requires exactly one argument")
        self.path = ""

    def expand(self, scope: Scope) -> None:
        self.path = self._expand(scope, self.args)
        if not self.path:
            raise self.error("WORKDIR requires a non-empty path")

    def resolve(self, image: ImageConfig) -> str:
        return posixpath.normpath(posixpath.join(image.workdir, self.path))

    def update_config(self, image: ImageConfig) -> None:
        image.config["WorkingDir"] = self.resolve(image)

    def cache_text(self) -> str:
        return f"WORKDIR {self.path}"


_ARG_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Arg(Instruction):
    keyword = "ARG"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        words = split_words(self.args, escape)
        if not words:
            raise self.error("ARG requires at least one argument")
        self.raw: list[tuple[str, str | None]] = []
        for word in words:
            name, has_default, default = word.partition("=")
            if not _ARG_NAME_RE.match(name):
                raise self.error(f"invalid ARG name {name!r}")
            self.raw.append((name, default if has_default else None))
        # Defaults after substitution, then each name with the value it took (set by the scope).
        self.defaults: list[tuple[str, str | None]] = []
        self.resolved: list[tuple[str, str | None]] = []

    def expand(self, scope: Scope) -> None:
        # Defaults are substituted one by one as the scope declares them (``ARG a=1 b=${a}2``).
        self.defaults = list(self.raw)

    def expand_default(self, scope: Scope, default: str | None) -> str | None:
        return None if default is None else self._expand(scope, default)

    def cache_text(self) -> str:
        return "ARG " + " ".join(name if v is None else f"{name}={json.dumps(v)}" for name, v in self.resolved)


class Onbuild(Instruction):
    keyword = "ONBUILD"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        trigger = self.args.split(None, 1)
        if not trigger:
            raise self.error("ONBUILD requires at least one argument")
        keyword = trigger[0].upper()
        if keyword == "ONBUILD":
            raise self.error("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
        if keyword in ("FROM", "MAINTAINER"):
            raise self.error(f"{keyword} isn't allowed as an ONBUILD trigger")
        if keyword not in GRAMMAR:
            raise self.error(f"unknown instruction in ONBUILD: {trigger[0]}")
        # Validate the trigger now, so a broken one fails this build and not the child's.
        nested = LogicalLine(keyword, trigger[1] if len(trigger) > 1 else "", line.line, self.args,
                             line.heredocs)
        GRAMMAR[keyword](nested, file, escape)
        self.trigger = self.args

    def update_config(self, image: ImageConfig) -> None:
        image.config["OnBuild"] = [*(image.config.get("OnBuild") or []), self.trigger]


class Stopsignal(Instruction):
    keyword = "STOPSIGNAL"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        if not self.args or len(self.args.split()) != 1:
            raise self.error("STOPSIGNAL requires exactly one argument")
        self.signal = ""

    def expand(self, scope: Scope) -> None:
        self.signal = self._expand(scope, self.args)
        if not signal_ok(self.signal):
            raise self.error(f"invalid signal: {self.signal}")

    def update_config(self, image: ImageConfig) -> None:
        image.config["StopSignal"] = self.signal

    def cache_text(self) -> str:
        return f"STOPSIGNAL {self.signal}"


class Healthcheck(Instruction):
    keyword = "HEALTHCHECK"
    string_flags = ("interval", "timeout", "start-period", "start-interval", "retries")

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        kind, _, rest = self.args.partition(" ")
        kind = kind.upper()
        self.check: dict[str, Any]
        if kind == "NONE":
            if rest.strip() or self.flags.values:
                raise self.error("HEALTHCHECK NONE takes no other arguments")
            self.check = {"Test": ["NONE"]}
            return
        if kind != "CMD":
            raise self.error("HEALTHCHECK requires NONE or CMD <command>")
        self.args = rest.strip()
        if not self.args:
            raise self.error("HEALTHCHECK CMD requires a command")
        exec_form, command = self._exec_or_shell()
        test = ["CMD", *exec_form] if exec_form is not None else ["CMD-SHELL", command]
        self.check = {"Test": test}
        names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
                 "start-interval": "StartInterval"}
        for flag, key in names.items():
            value = self.flags.get(flag)
            if value is None:
                continue
            try:
                duration = parse_duration(value)
            except ValueError:
                raise self.error(f"invalid --{flag}={value}: expected a duration such as 30s") from None
            if duration != 0 and duration < 1_000_000:
                raise self.error(f"--{flag} cannot be less than 1ms")
            self.check[key] = duration
        retries = self.flags.get("retries")
        if retries is not None:
            if not retries.isdigit() or int(retries) < 1:
                raise self.error(f"--retries must be at least 1, not {retries}")
            self.check["Retries"] = int(retries)

    def update_config(self, image: ImageConfig) -> None:
        image.config["Healthcheck"] = dict(self.check)

    def cache_text(self) -> str:
        return "HEALTHCHECK " + json.dumps(self.check, sort_keys=True)


class Shell(Instruction):
    keyword = "SHELL"

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        super().__init__(line, file, escape)
        exec_form, _ = self._exec_or_shell()
        if exec_form is None:
            raise self.error("SHELL requires the arguments to be in JSON form")
        if not exec_form:
            raise self.error("SHELL requires at least one argument")
        self.shell = exec_form

    def update_config(self, image: ImageConfig) -> None:
        image.shell = list(self.shell)
        image.config["Shell"] = list(self.shell)

    def cache_text(self) -> str:
        return "SHELL " + json.dumps(self.shell)


# The grammar: keyword -> the class that parses and carries out that instruction.
GRAMMAR: dict[str, type[Instruction]] = {cls.keyword: cls for cls in (
    From, Run, Cmd, Label, Maintainer, Expose, Env, Add, Copy, Entrypoint, Volume, User, Workdir,
    Arg, Onbuild, Stopsignal, Healthcheck, Shell,
)}
