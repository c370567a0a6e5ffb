"""The Dockerfile parser: text to a list of typed instructions, with no side effects.

Parsing happens in two passes, as in moby's ``parser`` package:

1. **Lines** (:mod:`builder.lines`). Parser directives (``# syntax``, ``# escape``, ``# check``) are
   read only at the very top, until the first line that is not one (a comment, a blank line or an
   instruction). After that, lines whose first non-blank character is ``#`` are comments, also in
   the middle of a continued instruction; an instruction continues while its line ends with the
   escape character (optionally followed by blanks). RUN, COPY and ADD may name heredocs
   (``<<EOF``, ``<<-EOF``, ``<<"EOF"``; several per instruction): their bodies are the raw lines that
   follow the instruction, in order, each up to its delimiter line.
2. **Instructions** (:mod:`builder.instructions`, :data:`GRAMMAR`; values in :mod:`builder.values`). The keyword (case-insensitive) selects an :class:`Instruction`
   subclass whose ``parse`` takes the flags it allows and splits its arguments (exec/JSON form or
   shell form, ``key=value`` pairs...). Variables are *not* substituted here: their values depend on
   the stage, on ``--build-arg`` and on ENV/ARG instructions met during the build, so every
   instruction has an :meth:`Instruction.expand` step that the builder calls in order.

Every instruction class has the same life cycle, driven by :mod:`builder.build`:
``parse`` (here) -> ``expand(scope)`` (variables substituted; raises on bad values) ->
``cache_text()`` (the instruction after substitution, part of the cache key) -> execution by the
builder (only instructions that change the filesystem: RUN, COPY, ADD, WORKDIR) -> ``update_config(image)``
(the image config after this step) -> a history entry. This module ties the passes together
and groups instructions into stages. Instructions that change only the config are
therefore pure and tested without building anything.

Every error is a :class:`DockerfileError` naming the file, the line and the offending text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from builder.instructions import (
    DEFAULT_SHELL,
    GRAMMAR,
    Add,
    Arg,
    Cmd,
    Copy,
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
    Run,
    Scope,
    Shell,
    Stopsignal,
    User,
    Volume,
    Workdir,
    is_url,
    parse_name_values,
)
from builder.lines import Directives, Heredoc, LogicalLine, logical_lines
from builder.values import RunMount, parse_duration, parse_mount, parse_ports
from lamina.errors import DockerfileError

__all__ = [
    "Add",
    "Arg",
    "Cmd",
    "Copy",
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
    "Scope",
    "Shell",
    "Stage",
    "Stopsignal",
    "User",
    "Volume",
    "Workdir",
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


# --- the whole file ------------------------------------------------------------------------------


@dataclass
class Stage:
    index: int
    name: str | None
    from_: From
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    file: str
    directives: Directives
    global_args: list[Arg]
    stages: list[Stage]

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
    return cls(line, file, escape)


def parse(text: str, file: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile; raises :class:`DockerfileError` for anything malformed."""
    # A NUL can reach neither a path nor an argv nor an environment: refuse it here, with its line,
    # rather than deep in a step (or, for ENV, in every later `lamina run` of the image).
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if "\0" in raw_line:
            raise DockerfileError("NUL character in the line", file, number, raw_line.replace("\0", "\\0"))
    directives, lines = logical_lines(text, file)
    global_args: list[Arg] = []
    stages: list[Stage] = []
    names: set[str] = set()
    for line in lines:
        inst = parse_instruction(line, file, directives.escape)
        if isinstance(inst, From):
            if inst.name:
                if inst.name in names:
                    raise inst.error(f"duplicate stage name {inst.name!r}")
                names.add(inst.name)
            stages.append(Stage(len(stages), inst.name, inst))
        elif not stages:
            if not isinstance(inst, Arg):
                raise inst.error(f"{inst.keyword} before the first FROM: only ARG may come before FROM")
            global_args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise DockerfileError("no FROM instruction: a Dockerfile needs at least one stage", file)
    return Dockerfile(file, directives, global_args, stages)


def parse_trigger(trigger: str, file: str, line: int) -> Instruction:
    """Parse an ONBUILD trigger from a base image's config (heredoc bodies are inline there)."""
    text = trigger
    _, lines = logical_lines(text, file)
    if len(lines) != 1:
        raise DockerfileError(f"invalid ONBUILD trigger in base image: {trigger!r}", file, line)
    lines[0].line = line
    return parse_instruction(lines[0], file, "\\")
