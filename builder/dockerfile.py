"""The Dockerfile parser: text to a list of typed instructions, with no side effects.

Parsing happens in two passes, as in moby's ``parser`` package:

1. **Lines** (:mod:`builder.lines`). Parser directives (``# syntax``, ``# escape``, ``# check``) are
   read only at the very top, until the first line that is not one (a comment, a blank line or an
   instruction). After that, lines whose first non-blank character is ``#`` are comments, also in
   the middle of a continued instruction; an instruction continues while its line ends with the
   escape character (optionally followed by blanks). RUN, COPY and ADD may name heredocs
   (``<<EOF``, ``<<-EOF``, ``<<"EOF"``; several per instruction): their bodies are the raw lines that
   follow the instruction, in order, each up to its delimiter line.
2. **Instructions** (:mod:`builder.instructions`, :mod:`builder.layer_instructions`, :data:`GRAMMAR`;
   values in :mod:`builder.values`). The keyword (case-insensitive) selects an :class:`Instruction`
   subclass, which takes the flags it allows and splits its arguments (exec/JSON form or shell form,
   ``key=value`` pairs...). Variables are *not* substituted here: their values depend on the stage,
   on ``--build-arg`` and on ENV/ARG instructions met during the build.

The result is immutable and the same for every build of the text. Each instruction then follows
one life cycle, driven by :mod:`builder.build` and described in :mod:`builder.instructions`:
``prepare`` -> ``cache_text`` -> ``execute`` (on a cache miss) -> ``update_config`` -> a history
entry. This module ties the passes together and groups instructions into stages. Instructions that
change only the config are pure and tested without building anything.

Every error is a :class:`DockerfileError` naming the file, the line and the offending text.
"""

from __future__ import annotations

from builder.instructions import (
    DEFAULT_SHELL,
    Arg,
    BaseRef,
    Cmd,
    Entrypoint,
    Env,
    Expose,
    Flags,
    From,
    Healthcheck,
    ImageConfig,
    Instruction,
    Label,
    Maintainer,
    Onbuild,
    Scope,
    Shell,
    Step,
    Stopsignal,
    User,
    Volume,
    parse_name_values,
)
from builder.layer_instructions import Add, Copy, CopyStep, Run, RunStep, Workdir, WorkdirStep
from builder.lines import Directives, Heredoc, LogicalLine, logical_lines
from builder.record import Record, record
from builder.values import RunMount, is_url, parse_duration, parse_mount, parse_ports
from lamina.errors import DockerfileError

__all__ = [
    "Add",
    "Arg",
    "BaseRef",
    "Cmd",
    "Copy",
    "CopyStep",
    "DEFAULT_SHELL",
    "Directives",
    "Dockerfile",
    "Entrypoint",
    "Env",
    "Expose",
    "Flags",
    "From",
    "GRAMMAR",
    "Healthcheck",
    "Heredoc",
    "ImageConfig",
    "Instruction",
    "Label",
    "LogicalLine",
    "Maintainer",
    "Onbuild",
    "Run",
    "RunMount",
    "RunStep",
    "Scope",
    "Shell",
    "Stage",
    "Step",
    "Stopsignal",
    "User",
    "Volume",
    "Workdir",
    "WorkdirStep",
    "is_url",
    "logical_lines",
    "parse",
    "parse_duration",
    "parse_instruction",
    "parse_mount",
    "parse_name_values",
    "parse_ports",
    "parse_trigger",
]


# The grammar: keyword -> the class that parses that instruction and carries out its life cycle.
GRAMMAR: dict[str, type[Instruction]] = {cls.keyword: cls for cls in (
    From, Run, Cmd, Label, Maintainer, Expose, Env, Add, Copy, Entrypoint, Volume, User, Workdir,
    Arg, Onbuild, Stopsignal, Healthcheck, Shell,
)}


# --- the whole file ------------------------------------------------------------------------------


@record
class Stage(Record):
    index: int
    name: str | None
    from_: From
    instructions: tuple[Instruction, ...] = ()


@record
class Dockerfile(Record):
    file: str
    directives: Directives
    global_args: tuple[Arg, ...]
    stages: tuple[Stage, ...]

    def stage(self, name_or_index: str) -> Stage:
        for stage in self.stages:
            if stage.name == name_or_index.lower():
                return stage
        if name_or_index.isdigit() and int(name_or_index) < len(self.stages):
            return self.stages[int(name_or_index)]
        raise DockerfileError(f"target stage {name_or_index!r} could not be found", self.file)


def parse_instruction(line: LogicalLine, file: str, escape: str) -> Instruction:
    cls = GRAMMAR.get(line.keyword)
    if cls is None:
        raise DockerfileError(f"unknown instruction: {line.keyword}", file, line.line, line.text)
    inst = cls(line, file, escape)
    nested = inst.nested_line()
    if nested is not None:
        # ONBUILD's trigger is checked now, so a broken one fails this build and not the child's.
        word, nested_line = nested
        if nested_line.keyword not in GRAMMAR:
            raise inst.error(f"unknown instruction in ONBUILD: {word}")
        parse_instruction(nested_line, file, escape)
    return inst


def parse(text: str, file: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile; raises :class:`DockerfileError` for anything malformed."""
    # A NUL can reach neither a path nor an argv nor an environment: refuse it here, with its line,
    # rather than deep in a step (or, for ENV, in every later `lamina run` of the image).
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if "\0" in raw_line:
            raise DockerfileError("NUL character in the line", file, number, raw_line.replace("\0", "\\0"))
    directives, lines = logical_lines(text, file)
    global_args: list[Arg] = []
    stages: list[tuple[From, list[Instruction]]] = []
    names: set[str] = set()
    for line in lines:
        inst = parse_instruction(line, file, directives.escape)
        if isinstance(inst, From):
            if inst.name:
                if inst.name in names:
                    raise inst.error(f"duplicate stage name {inst.name!r}")
                names.add(inst.name)
            stages.append((inst, []))
        elif not stages:
            if not isinstance(inst, Arg):
                raise inst.error(f"{inst.keyword} before the first FROM: only ARG may come before FROM")
            global_args.append(inst)
        else:
            stages[-1][1].append(inst)
    if not stages:
        raise DockerfileError("no FROM instruction: a Dockerfile needs at least one stage", file)
    return Dockerfile(file, directives, tuple(global_args),
                      tuple(Stage(index, from_.name, from_, tuple(insts)) for index, (from_, insts) in enumerate(stages)))


def parse_trigger(trigger: str, file: str, line: int) -> Instruction:
    """Parse an ONBUILD trigger from a base image's config (heredoc bodies are inline there)."""
    text = trigger
    _, lines = logical_lines(text, file)
    if len(lines) != 1:
        raise DockerfileError(f"invalid ONBUILD trigger in base image: {trigger!r}", file, line)
    lines[0].line = line
    return parse_instruction(lines[0], file, "\\")
