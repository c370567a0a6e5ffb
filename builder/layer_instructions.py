"""The instructions that change files: RUN, COPY, ADD and WORKDIR (see :mod:`builder.instructions`
for the life cycle they share with the others).

Their steps execute through the services of the :class:`~builder.step.StepContext`: RUN through
the sandbox (:mod:`builder.running`), COPY, ADD and WORKDIR by writing a fresh layer directory
(:mod:`builder.copying`). Preparing COPY and ADD reads what they copy, because its content is part of
the cache key: the context's files (hashed, :mod:`builder.context`), the key of the stage copied from,
or a URL's content (:mod:`builder.remote`).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from typing import TYPE_CHECKING, Any

from builder.instructions import ImageConfig, Instruction, Scope, Step, json_or_words
from builder.lines import HEREDOC_WORD_RE, Heredoc, LogicalLine
from builder.record import record
from builder.shellwords import SubstitutionError
from builder.values import RunMount, is_url, parse_mount
from lamina.errors import BuildError, DockerfileError

if TYPE_CHECKING:
    from builder.step import Source, StepContext
    from lamina.store import Layer


# --- RUN ------------------------------------------------------------------------------------------


@record
class RunStep(Step):
    mounts: tuple[RunMount, ...]  # variables substituted
    argv: tuple[str, ...]  # what the sandbox executes, given the stage's SHELL
    script: Heredoc | None  # a single heredoc starting with #!: run as a file at /dev/pipes/NAME
    network: str  # default, none or host
    exec_form: bool
    bind_digest: str = ""  # what the bind mounts show the command (their sources' content)
    ulimits: tuple[tuple[str, int, int], ...] = ()  # build --ulimit: (name, soft, hard)

    def cache_text(self) -> str:
        # Secrets and agents by name and place only: BuildKit keeps their content out of the key.
        mounts = " ".join(f"--mount={m}" + (f"(env={m.env!r},required={m.required})"
                                             if m.type in ("secret", "ssh") else "")
                          for m in self.mounts)
        network = f"--network={self.network} " if self.network != "default" else ""
        body = json.dumps(list(self.argv)) if self.argv else self.instruction.args
        heredocs = "".join(f"\n{d.name}:{d.raw_body}" for d in self.instruction.heredocs)
        binds = f" binds={self.bind_digest}" if self.bind_digest else ""
        # A command may read its limits (BuildKit keys them too); without --ulimit the key is as before.
        ulimits = "".join(f" ulimit={name}={soft}:{hard}" for name, soft, hard in self.ulimits)
        return f"RUN {network}{mounts} {body}{heredocs}{binds}{ulimits}"

    def binds_key(self, ctx: StepContext) -> str:
        """The content of what ``--mount=type=bind`` shows the command: the context files it names
        (hashed as COPY's sources are) or the key of the stage or image it comes from. A command
        that reads a changed file must run again, here and on another machine sharing the cache."""
        parts = []
        for mount in self.mounts:
            if mount.type != "bind":
                continue
            if mount.from_:
                parts.append("from:" + ctx.source(mount.from_, self.instruction).key)
                continue
            context = ctx.services.context
            parts.append(context.digest(context.resolve(mount.source or "/")))
        return ",".join(parts)

    def created_by(self) -> str:
        # As docker shows it: the shell form joined, the exec form as JSON.
        return "RUN " + (json.dumps(list(self.argv)) if self.exec_form else " ".join(self.argv))

    def command_text(self) -> str:
        """The command as docker's error message quotes it."""
        return json.dumps(list(self.argv)) if self.exec_form else " ".join(self.argv)

    def execute(self, ctx: StepContext) -> Layer | None:
        return ctx.services.run(self, ctx)


class Run(Instruction):
    keyword = "RUN"
    string_flags = ("network", "security")
    multi_flags = ("mount",)

    def _parse(self, line: LogicalLine) -> None:
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
        mounts = []
        agents = 0
        for spec in self.flags.all("mount"):
            mount = parse_mount(spec, self.error)
            if mount.type == "ssh":
                # BuildKit's llb: the Nth ssh mount without a target is /run/buildkit/ssh_agent.N.
                mount = dataclasses.replace(mount, target=mount.target or f"/run/buildkit/ssh_agent.{agents}")
                agents += 1
            mounts.append(mount)
        self.mounts = tuple(mounts)

    def stage_refs(self) -> tuple[str, ...]:
        return tuple(m.from_ for m in self.mounts if m.from_)

    def resolve_argv(self, image: ImageConfig) -> tuple[tuple[str, ...], Heredoc | None]:
        """The argv to execute given the stage's SHELL, and the heredoc run as a script if any
        (docker's heredoc rules for RUN)."""
        if self.exec_form is not None:
            return self.exec_form, None
        if self.heredocs:
            only = HEREDOC_WORD_RE.match(self.command.strip())
            if len(self.heredocs) == 1 and only and " " not in self.command.strip():
                doc = self.heredocs[0]
                if doc.body.startswith("#!"):
                    return (f"/dev/pipes/{doc.name}",), doc
                return tuple(image.with_shell(doc.body)), None
            # Anything else: hand the command and the heredocs to the shell, which does its own
            # heredoc processing (so <<- and quoted delimiters keep their shell meaning).
            full = self.command
            for doc in self.heredocs:
                full += "\n" + doc.raw_body + doc.name
            return tuple(image.with_shell(full)), None
        return tuple(image.with_shell(self.command)), None

    def _expand_mount(self, scope: Scope, mount: RunMount) -> dict[str, Any]:
        return {attr: self._expand(scope, value) for attr in ("target", "source", "from_", "id", "env")
                if (value := getattr(mount, attr)) is not None}

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        # Only the mount specifications are substituted; the command belongs to the shell.
        mounts = tuple(dataclasses.replace(m, **self._expand_mount(scope, m)) for m in self.mounts)
        argv, script = self.resolve_argv(image)
        return RunStep(self, mounts, argv, script, self.network, self.exec_form is not None)

    def prepare(self, ctx: StepContext) -> Step:
        step = self.expand(ctx.scope, ctx.image)
        assert isinstance(step, RunStep)
        network = ctx.services.network if step.network == "default" else step.network
        return dataclasses.replace(step, bind_digest=step.binds_key(ctx), network=network,
                                   ulimits=ctx.services.ulimits)


# --- COPY and ADD ---------------------------------------------------------------------------------


@record
class CopyStep(Step):
    """COPY or ADD, prepared: what to copy where, and a key standing for the sources' content."""

    sources: tuple[str, ...]
    dest: str
    chown: str | None
    chmod: str | None
    heredocs: tuple[Heredoc, ...]  # bodies substituted where the delimiter was not quoted
    from_stage: str | None  # COPY --from
    checksum: str | None  # ADD --checksum
    keeps_parents: bool  # COPY --parents
    extracts_archives: bool  # ADD: a local tar archive is unpacked, a URL fetched
    content_digest: str = ""

    def heredoc_for(self, source: str) -> Heredoc | None:
        m = HEREDOC_WORD_RE.match(source)
        if not m:
            return None
        name = m.group(3).strip("'\"")
        return next((doc for doc in self.heredocs if doc.name == name), None)

    def is_remote(self, source: str) -> bool:
        return self.extracts_archives and is_url(source)

    def cache_text(self) -> str:
        inst = self.instruction
        flags = "".join(f"--{k}={','.join(v)} " for k, v in sorted(inst.flags.values.items()))
        docs = "".join(f"\n{d.name}:{d.body}" for d in self.heredocs)
        return (f"{inst.keyword} {flags}{json.dumps(list(self.sources))} {json.dumps(self.dest)}"
                f" content={self.content_digest}{docs}")

    def source_stage(self, ctx: StepContext) -> Source:
        """The stage or image of ``--from``: its files and a key standing for their content."""
        assert self.from_stage is not None
        if self.from_stage.lower() in (ctx.stage_name, str(ctx.stage_index)):
            raise self.error(f"circular dependency detected on stage: {self.from_stage}")  # BuildKit's words
        return ctx.source(self.from_stage, self.instruction)

    def content_key(self, ctx: StepContext) -> str:
        """What the sources hold, as the cache key needs it (the files are read, URLs fetched)."""
        if self.from_stage is not None:
            return "from:" + self.source_stage(ctx).key
        local = [s for s in self.sources if not self.heredoc_for(s) and not self.is_remote(s)]
        urls = [s for s in self.sources if self.is_remote(s)]
        digest = ""
        try:
            rels = [rel for source in local for rel in ctx.services.context.resolve(source)]
            if rels:
                digest = ctx.services.context.digest(rels)
        except BuildError as e:
            raise self.error(f"{self.instruction.keyword} failed: {e}") from None
        # BuildKit's key for a URL: the content's digest (pinned by --checksum, else fetched), name and time.
        if urls and self.checksum is not None:
            digest += "|urls:" + self.checksum
        for url in urls if self.checksum is None else []:
            digest += f"|url:{url} {ctx.services.downloads.fetch(url, self.instruction).cache_text()}"
        return digest

    def execute(self, ctx: StepContext) -> Layer | None:
        return ctx.services.workspace.write_layer(lambda tmp, diff: ctx.services.copy(self, ctx, tmp, diff))


class CopyInstruction(Instruction):
    """COPY and ADD: sources (context paths, heredocs, URLs for ADD) and a destination."""

    extracts_archives = False

    def _parse(self, line: LogicalLine) -> None:
        items, self.is_json = json_or_words(self)
        if len(items) < 2:
            raise self.error(f"{self.keyword} requires at least two arguments, but only "
                             f"{len(items)} {'was' if len(items) == 1 else 'were'} provided. "
                             "Destination could not be determined.")
        self.raw_sources = items[:-1]
        self.raw_dest = items[-1]
        self.chown = self.flags.get("chown")
        self.chmod = self.flags.get("chmod")
        self.from_stage = self.flags.get("from")
        self.checksum = self.flags.get("checksum")
        if self.flags.all("exclude"):
            # Refused rather than ignored: silently copying excluded files would be worse.
            raise self.error(f"{self.keyword} --exclude is not supported by lamina (use .dockerignore)")

    def _is_heredoc(self, source: str) -> bool:
        m = HEREDOC_WORD_RE.match(source)
        return m is not None and any(doc.name == m.group(3).strip("'\"") for doc in self.heredocs)

    def stage_refs(self) -> tuple[str, ...]:
        return (self.from_stage,) if self.from_stage is not None else ()

    def expand(self, scope: Scope, image: ImageConfig) -> CopyStep:
        def one(word: str) -> str:
            if self.is_json:
                # JSON form: no quote processing, but variables are still substituted.
                try:
                    return scope.lexer.process_word(word.replace('"', '\\"').replace("'", "\\'"),
                                                    scope.variables())
                except SubstitutionError as e:
                    raise self.error(str(e)) from None
            return self._expand(scope, word)

        sources = tuple(src if self._is_heredoc(src) else one(src) for src in self.raw_sources)
        if not self.extracts_archives and any(is_url(s) for s in sources):
            raise self.error("source can't be a URL for COPY")  # BuildKit's words (dockerfile2llb)
        dest = one(self.raw_dest)
        if not dest:
            raise self.error(f"{self.keyword}: destination can not be empty")
        chown = self._expand(scope, self.chown) if self.chown is not None else None
        chmod = None
        if self.chmod is not None:
            chmod = self._expand(scope, self.chmod)
            if not re.fullmatch(r"[0-7]{3,4}", chmod):
                raise self.error(f"invalid --chmod={chmod}: only octal modes are supported")
        heredocs = tuple(dataclasses.replace(doc, body=_expand_heredoc(scope, doc.body)) if doc.expand else doc
                         for doc in self.heredocs)
        from_stage = self._expand(scope, self.from_stage) if self.from_stage is not None else None
        return CopyStep(self, sources, dest, chown, chmod, heredocs, from_stage, self.checksum,
                        self.flags.boolean("parents"), self.extracts_archives)

    def prepare(self, ctx: StepContext) -> Step:
        step = self.expand(ctx.scope, ctx.image)
        return dataclasses.replace(step, content_digest=step.content_key(ctx))


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


class Copy(CopyInstruction):
    keyword = "COPY"
    string_flags = ("from", "chown", "chmod")
    multi_flags = ("exclude",)
    bool_flags = ("link", "parents")


class Add(CopyInstruction):
    keyword = "ADD"
    string_flags = ("chown", "chmod", "checksum")
    multi_flags = ("exclude",)
    bool_flags = ("link", "keep-git-dir")
    extracts_archives = True

    def _parse(self, line: LogicalLine) -> None:
        super()._parse(line)
        if self.checksum is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", self.checksum):
            raise self.error(f"invalid --checksum={self.checksum}: expected sha256:<64 hex digits>")

    def expand(self, scope: Scope, image: ImageConfig) -> CopyStep:
        step = super().expand(scope, image)
        if self.checksum is not None and not all(is_url(s) for s in step.sources):
            raise self.error("--checksum can only be used with HTTP(S) sources")
        for source in step.sources:
            if source.startswith(("git@", "git://")) or (is_url(source) and source.split("#")[0].endswith(".git")):
                raise self.error(f"ADD of a git repository is not supported by lamina: {source}")
        return step


# --- WORKDIR --------------------------------------------------------------------------------------


@record
class WorkdirStep(Step):
    path: str  # as written, variables substituted
    resolved: str  # absolute, against the WORKDIR before

    def cache_text(self) -> str:
        return f"WORKDIR {self.path}"

    def execute(self, ctx: StepContext) -> Layer | None:
        # A layer only when the directory does not exist yet.
        if ctx.view().exists_as_dir(self.resolved):
            return None
        return ctx.services.workspace.write_layer(
            lambda tmp, diff: ctx.services.make_workdir(self.resolved, ctx, diff))

    def update_config(self, image: ImageConfig) -> None:
        image.config["WorkingDir"] = self.resolved


class Workdir(Instruction):
    keyword = "WORKDIR"

    def _parse(self, line: LogicalLine) -> None:
        if not self.args:
            raise self.error("WORKDIR requires exactly one argument")

    def expand(self, scope: Scope, image: ImageConfig) -> Step:
        path = self._expand(scope, self.args)
        if not path:
            raise self.error("WORKDIR requires a non-empty path")
        return WorkdirStep(self, path, posixpath.normpath(posixpath.join(image.workdir, path)))
