"""Pass 2 of the Dockerfile parser: one class per instruction, the grammar kept as data, and the
life cycle every instruction follows in a build.

Each :class:`Instruction` subclass declares its keyword and the flags it allows and parses its
arguments (exec/JSON or shell form, ``key=value`` pairs, ...) when it is made. What it parsed never
changes afterwards: an instruction is the same object in every build of the Dockerfile, and setting
an attribute on it raises. What one build makes of it is a :class:`Step`:

* ``prepare(ctx)`` (on the instruction): substitute variables, resolve what the step reads and
  compute what its cache key depends on; returns the :class:`Step`. ``expand(scope, image)`` is its
  pure part (no files read), which the tests use directly.
* ``step.cache_text()``: the instruction after substitution, part of the cache key
  (:mod:`builder.cache`); ``step.created_by()``: its history line.
* ``step.execute(ctx)``: on a cache miss, make the step's layer (None for no layer), using only the
  narrow :class:`~builder.step.StepContext`.
* ``step.update_config(image)``: apply the step to the image config being built.

This module holds the base classes, FROM and the instructions that change only the config; RUN,
COPY, ADD and WORKDIR, which change files, are in :mod:`builder.layer_instructions`; the keyword
table is :data:`builder.dockerfile.GRAMMAR`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from builder.lines import Heredoc, LogicalLine
from builder.record import Record, record
from builder.shellwords import Lexer, SubstitutionError, split_words
from builder.values import parse_duration, parse_ports, signal_ok
from lamina.errors import DockerfileError

if TYPE_CHECKING:
    from builder.step import StepContext
    from lamina.store import Layer

DEFAULT_SHELL = ["/bin/sh", "-c"]
# The PATH docker's builders give a stage whose base image sets none (BuildKit's
# system.DefaultPathEnv for linux): written into the stage's config, so it is in scope for
# variable expansion, in RUN's environment and in the image built.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_ENV_NAME_RE = re.compile(r"^[^=\s]+$")


class Scope(Protocol):
    """The variables an instruction's arguments are expanded with."""

    lexer: Lexer

    def variables(self) -> Mapping[str, str]:
        """The variables visible to this instruction: declared ARGs with a value, then ENV."""
        ...


@record
class Flags(Record):
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        found = self.values.get(name)
        return found[-1] if found else None

    def all(self, name: str) -> tuple[str, ...]:
        return self.values.get(name, ())

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        return value is not None and value.lower() in ("", "true", "1")


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


@record
class Step(Record):
    """An instruction as one build prepared it (see the module docstring). Subclasses carry the
    values after substitution; this base serves instructions that have none."""

    instruction: Instruction

    def error(self, message: str) -> DockerfileError:
        return self.instruction.error(message)

    def cache_text(self) -> str:
        """The instruction after substitution: what the cache key and the history record."""
        return f"{self.instruction.keyword} {self.instruction.args}".strip()

    def created_by(self) -> str:
        """The history entry's ``created_by``."""
        return self.instruction.text

    def execute(self, ctx: StepContext) -> Layer | None:
        """Make this step's layer on a cache miss; None when it makes none (the default)."""
        return None

    def update_config(self, image: ImageConfig) -> None:
        """Apply this step to the image config being built (the default: nothing)."""


class Instruction:
    """One Dockerfile instruction, as parsed. Subclasses declare their keyword, their flags and how
    they parse (``_parse``).

    ``string_flags`` take ``--name=value`` (``multi_flags`` may repeat), ``bool_flags`` take ``--name``
    or ``--name=true|false``. Whether variables are substituted in the arguments is up to each
    class's ``expand`` (docker does it for ENV, LABEL, COPY, ADD, FROM, WORKDIR, USER, EXPOSE, VOLUME,
    STOPSIGNAL, ARG, never for RUN, CMD, ENTRYPOINT, SHELL, whose words belong to the shell at run
    time).
    """

    keyword: ClassVar[str] = ""
    string_flags: ClassVar[tuple[str, ...]] = ()
    multi_flags: ClassVar[tuple[str, ...]] = ()
    bool_flags: ClassVar[tuple[str, ...]] = ()
    _sealed: bool = False

    def __init__(self, line: LogicalLine, file: str, escape: str) -> None:
        self.line = line.line
        self.text = line.text
        self.file = file
        self.escape = escape
        self.heredocs: tuple[Heredoc, ...] = tuple(line.heredocs)
        self.flags, self.args = self._take_flags(line.args)
        self._parse(line)
        self._sealed = True

    def __setattr__(self, name: str, value: Any) -> None:
        if self._sealed:
            # A build's values belong to its Step: the parse result is shared by every build.
            raise AttributeError(f"{type(self).__name__}.{name}: an instruction does not change after parsing")
        super().__setattr__(name, value)

    def _parse(self, line: LogicalLine) -> None:
        """Check and split ``self.args`` (flags already taken); raise :meth:`error` when malformed."""

    # --- errors and helpers
    def error(self, message: str) -> DockerfileError:
        return DockerfileError(message, self.file, self.line, self.text)

    def _take_flags(self, args: str) -> tuple[Flags, str]:
        values: dict[str, list[str]] = {}
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
                values.setdefault(name, []).append(value if has_value else "true")
            elif name in self.string_flags or name in self.multi_flags:
                if not has_value:
                    raise self.error(f"missing a value on flag: --{name}")
                if name in self.string_flags and name in values and name not in self.multi_flags:
                    raise self.error(f"duplicate flag specified: --{name}")
                values.setdefault(name, []).append(_unquote_flag(value))
            else:
                raise self.error(f"unknown flag: --{name}")
            rest = remainder.strip()
        return Flags(MappingProxyType({k: tuple(v) for k, v in values.items()})), rest

    def _exec_or_shell(self) -> tuple[tuple[str, ...] | None, str]:
        """(exec-form argv, "") for a JSON array of strings, else (None, shell command)."""
        args = self.args
        if args.startswith("["):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
                return tuple(parsed), ""
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

    # --- life cycle
    def stage_refs(self) -> tuple[str, ...]:
        """The other stages or images this instruction reads files from (unexpanded)."""
        return ()

    def nested_line(self) -> tuple[str, LogicalLine] | None:
        """An instruction written inside this one (ONBUILD's trigger), with its keyword as written."""
        return None

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        """The pure part of :meth:`prepare`: substitute variables from ``scope``, given the config
        so far; nothing is read from files."""
        return Step(self)

    def prepare(self, ctx: StepContext) -> Step:
        """This instruction, prepared for one step of a build (see the module docstring)."""
        return self.expand(ctx.scope, ctx.image)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} line {self.line}: {self.text!r}>"


def _unquote_flag(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
        return value[1:-1]
    return value


def json_or_words(inst: Instruction) -> tuple[tuple[str, ...], bool]:
    """(items, is_json) for instructions taking a JSON array or whitespace-separated words."""
    if inst.args.startswith("["):
        try:
            parsed = json.loads(inst.args)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
            return tuple(parsed), True
    return tuple(split_words(inst.args, inst.escape)), False


# --- FROM -----------------------------------------------------------------------------------------


@record
class BaseRef(Record):
    """A stage's FROM after substitution of the global ARGs."""

    image: str
    platform: str | None


class From(Instruction):
    keyword = "FROM"
    string_flags = ("platform",)

    def _parse(self, line: LogicalLine) -> None:
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
        self.platform = self.flags.get("platform")

    def stage_refs(self) -> tuple[str, ...]:
        return (self.image_text,)

    def resolve(self, scope: Scope) -> BaseRef:
        """The base image (or stage) and platform named, variables substituted."""
        image = self._expand(scope, self.image_text)
        if not image:
            raise self.error(f"base name ({self.image_text}) should not be blank")
        platform = self._expand(scope, self.platform) if self.platform is not None else None
        return BaseRef(image, platform)


# --- instructions that change only the config ------------------------------------------------------


@record
class CommandStep(Step):
    argv: tuple[str, ...]

    def cache_text(self) -> str:
        return f"{self.instruction.keyword} {json.dumps(list(self.argv))}"


class CmdStep(CommandStep):
    def update_config(self, image: ImageConfig) -> None:
        image.config["Cmd"] = list(self.argv) or None
        image.cmd_set_in_stage = True


class EntrypointStep(CommandStep):
    def update_config(self, image: ImageConfig) -> None:
        image.config["Entrypoint"] = list(self.argv) or None
        if not image.cmd_set_in_stage:
            # A CMD inherited from the base makes no sense with a new ENTRYPOINT (docker resets it).
            image.config["Cmd"] = None


class CommandInstruction(Instruction):
    """CMD and ENTRYPOINT: exec form kept as is, shell form wrapped in the stage's SHELL."""

    step_type: ClassVar[type[CommandStep]] = CommandStep

    def _parse(self, line: LogicalLine) -> None:
        self.exec_form, self.command = self._exec_or_shell()

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        if self.exec_form is not None:
            return self.step_type(self, self.exec_form)
        return self.step_type(self, tuple(image.with_shell(self.command)) if self.command else ())


class Cmd(CommandInstruction):
    keyword = "CMD"
    step_type = CmdStep


class Entrypoint(CommandInstruction):
    keyword = "ENTRYPOINT"
    step_type = EntrypointStep


def parse_name_values(inst: Instruction, keyword: str) -> tuple[tuple[str, str], ...]:
    """docker's parseNameVal: ``k=v k2="v 2"`` or the legacy ``key value with spaces`` form."""
    words = split_words(inst.args, inst.escape)
    if not words:
        raise inst.error(f"{keyword} requires at least one argument")
    if "=" not in words[0]:
        parts = inst.args.split(None, 1)
        if len(parts) < 2:
            raise inst.error(f"{keyword} must have two arguments")
        return ((parts[0], parts[1]),)
    pairs = []
    for word in words:
        if "=" not in word:
            raise inst.error(f"syntax error - can't find = in {word!r}. Must be of the form: name=value")
        key, _, value = word.partition("=")
        if not key:
            raise inst.error(f"{keyword} names can not be blank")
        pairs.append((key, value))
    return tuple(pairs)


@record
class EnvStep(Step):
    pairs: tuple[tuple[str, str], ...]

    def cache_text(self) -> str:
        return "ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in self.pairs)

    def update_config(self, image: ImageConfig) -> None:
        for key, value in self.pairs:
            image.set_env(key, value)


class Env(Instruction):
    keyword = "ENV"

    def _parse(self, line: LogicalLine) -> None:
        self.raw_pairs = parse_name_values(self, "ENV")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        # Each pair sees the variables as they were before this instruction (docker's rule).
        pairs = tuple((self._expand(scope, k), self._expand(scope, v)) for k, v in self.raw_pairs)
        for key, _ in pairs:
            if not _ENV_NAME_RE.match(key):
                raise self.error(f"invalid environment variable name {key!r}")
        return EnvStep(self, pairs)


@record
class LabelStep(Step):
    pairs: tuple[tuple[str, str], ...]

    def cache_text(self) -> str:
        return "LABEL " + " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in self.pairs)

    def update_config(self, image: ImageConfig) -> None:
        labels = dict(image.config.get("Labels") or {})
        labels.update(self.pairs)
        image.config["Labels"] = labels


class Label(Instruction):
    keyword = "LABEL"

    def _parse(self, line: LogicalLine) -> None:
        self.raw_pairs = parse_name_values(self, "LABEL")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        return LabelStep(self, tuple((self._expand(scope, k), self._expand(scope, v)) for k, v in self.raw_pairs))


@record
class MaintainerStep(Step):
    def update_config(self, image: ImageConfig) -> None:
        image.author = self.instruction.args


class Maintainer(Instruction):
    keyword = "MAINTAINER"

    def _parse(self, line: LogicalLine) -> None:
        if not self.args:
            raise self.error("MAINTAINER requires exactly one argument")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        return MaintainerStep(self)


@record
class ExposeStep(Step):
    ports: tuple[str, ...]

    def cache_text(self) -> str:
        return "EXPOSE " + " ".join(self.ports)

    def update_config(self, image: ImageConfig) -> None:
        exposed = dict(image.config.get("ExposedPorts") or {})
        for port in self.ports:
            exposed[port] = {}
        image.config["ExposedPorts"] = exposed


class Expose(Instruction):
    keyword = "EXPOSE"

    def _parse(self, line: LogicalLine) -> None:
        if not self.args:
            raise self.error("EXPOSE requires at least one argument")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        ports = []
        for word in self._expand_words(scope, self.args):
            try:
                ports.extend(parse_ports(word))
            except ValueError:
                raise self.error(f"invalid port specification: {word!r}") from None
        return ExposeStep(self, tuple(ports))


@record
class VolumeStep(Step):
    volumes: tuple[str, ...]

    def cache_text(self) -> str:
        return "VOLUME " + json.dumps(list(self.volumes))

    def update_config(self, image: ImageConfig) -> None:
        volumes = dict(image.config.get("Volumes") or {})
        for v in self.volumes:
            volumes[v] = {}
        image.config["Volumes"] = volumes


class Volume(Instruction):
    keyword = "VOLUME"

    def _parse(self, line: LogicalLine) -> None:
        self.raw_items, self.is_json = json_or_words(self)
        if not self.raw_items:
            raise self.error("VOLUME requires at least one argument")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        volumes = tuple(self._expand(scope, v) if not self.is_json else v for v in self.raw_items)
        for v in volumes:
            if not v.strip():
                raise self.error("VOLUME specified can not be an empty string")
        return VolumeStep(self, volumes)


@record
class UserStep(Step):
    user: str

    def cache_text(self) -> str:
        return f"USER {self.user}"

    def update_config(self, image: ImageConfig) -> None:
        image.config["User"] = self.user


class User(Instruction):
    keyword = "USER"

    def _parse(self, line: LogicalLine) -> None:
        if not self.args or len(split_words(self.args, self.escape)) != 1:
            raise self.error("USER requires exactly one argument")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        user = self._expand(scope, self.args)
        if not user:
            raise self.error("USER requires a non-empty user name or id")
        return UserStep(self, user)


_ARG_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@record
class ArgStep(Step):
    resolved: tuple[tuple[str, str | None], ...]  # each name with the value it took

    def cache_text(self) -> str:
        return "ARG " + " ".join(name if v is None else f"{name}={json.dumps(v)}" for name, v in self.resolved)


class Arg(Instruction):
    keyword = "ARG"

    def _parse(self, line: LogicalLine) -> None:
        words = split_words(self.args, self.escape)
        if not words:
            raise self.error("ARG requires at least one argument")
        raw: list[tuple[str, str | None]] = []
        for word in words:
            name, has_default, default = word.partition("=")
            if not _ARG_NAME_RE.match(name):
                raise self.error(f"invalid ARG name {name!r}")
            raw.append((name, default if has_default else None))
        self.defaults: tuple[tuple[str, str | None], ...] = tuple(raw)  # as written, unsubstituted

    def expand_default(self, scope: Scope, default: str | None) -> str | None:
        return None if default is None else self._expand(scope, default)

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        # Without a stage to declare in: each default as ``scope`` sees it (no --build-arg).
        return ArgStep(self, tuple((name, self.expand_default(scope, d)) for name, d in self.defaults))

    def prepare(self, ctx: StepContext) -> Step:
        # Defaults are substituted one by one as the stage declares them (``ARG a=1 b=${a}2``).
        return ArgStep(self, ctx.scope.declare(self))


class Onbuild(Instruction):
    keyword = "ONBUILD"

    def _parse(self, line: LogicalLine) -> None:
        trigger = self.args.split(None, 1)
        if not trigger:
            raise self.error("ONBUILD requires at least one argument")
        keyword = trigger[0].upper()
        if keyword == "ONBUILD":
            raise self.error("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
        if keyword in ("FROM", "MAINTAINER"):
            raise self.error(f"{keyword} isn't allowed as an ONBUILD trigger")
        # Parsed by the grammar too (see nested_line), so a broken one fails this build and not the child's.
        self._trigger = (trigger[0], LogicalLine(keyword, trigger[1] if len(trigger) > 1 else "", line.line,
                                                 self.args, list(line.heredocs)))
        self.trigger = self.args

    def nested_line(self) -> tuple[str, LogicalLine] | None:
        return self._trigger

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        return OnbuildStep(self, self.trigger)


@record
class OnbuildStep(Step):
    trigger: str

    def update_config(self, image: ImageConfig) -> None:
        image.config["OnBuild"] = [*(image.config.get("OnBuild") or []), self.trigger]


@record
class StopsignalStep(Step):
    signal: str

    def cache_text(self) -> str:
        return f"STOPSIGNAL {self.signal}"

    def update_config(self, image: ImageConfig) -> None:
        image.config["StopSignal"] = self.signal


class Stopsignal(Instruction):
    keyword = "STOPSIGNAL"

    def _parse(self, line: LogicalLine) -> None:
        if not self.args or len(self.args.split()) != 1:
            raise self.error("STOPSIGNAL requires exactly one argument")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        signal = self._expand(scope, self.args)
        if not signal_ok(signal):
            raise self.error(f"invalid signal: {signal}")
        return StopsignalStep(self, signal)


class Healthcheck(Instruction):
    keyword = "HEALTHCHECK"
    string_flags = ("interval", "timeout", "start-period", "start-interval", "retries")

    def _parse(self, line: LogicalLine) -> None:
        kind, _, rest = self.args.partition(" ")
        kind = kind.upper()
        if kind == "NONE":
            if rest.strip() or self.flags.values:
                raise self.error("HEALTHCHECK NONE takes no other arguments")
            self.check: Mapping[str, Any] = MappingProxyType({"Test": ("NONE",)})
            return
        if kind != "CMD":
            raise self.error("HEALTHCHECK requires NONE or CMD <command>")
        self.args = rest.strip()
        if not self.args:
            raise self.error("HEALTHCHECK CMD requires a command")
        exec_form, command = self._exec_or_shell()
        test = ["CMD", *exec_form] if exec_form is not None else ["CMD-SHELL", command]
        check: dict[str, Any] = {"Test": tuple(test)}
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
            check[key] = duration
        retries = self.flags.get("retries")
        if retries is not None:
            if not retries.isdigit() or int(retries) < 1:
                raise self.error(f"--retries must be at least 1, not {retries}")
            check["Retries"] = int(retries)
        self.check = MappingProxyType(check)

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        return HealthcheckStep(self, self.check)


@record
class HealthcheckStep(Step):
    check: Mapping[str, Any]

    def _check(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.check.items()}

    def cache_text(self) -> str:
        return "HEALTHCHECK " + json.dumps(self._check(), sort_keys=True)

    def update_config(self, image: ImageConfig) -> None:
        image.config["Healthcheck"] = self._check()


class Shell(Instruction):
    keyword = "SHELL"

    def _parse(self, line: LogicalLine) -> None:
        exec_form, _ = self._exec_or_shell()
        if exec_form is None:
            raise self.error("SHELL requires the arguments to be in JSON form")
        if not exec_form:
            raise self.error("SHELL requires at least one argument")
        self.shell = exec_form

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        return ShellStep(self, self.shell)


@record
class ShellStep(Step):
    shell: tuple[str, ...]

    def cache_text(self) -> str:
        return "SHELL " + json.dumps(list(self.shell))

    def update_config(self, image: ImageConfig) -> None:
        image.shell = list(self.shell)
        image.config["Shell"] = list(self.shell)
