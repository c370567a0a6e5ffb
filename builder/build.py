"""``lamina build``: a parsed Dockerfile to an image in the store, one step at a time.

The builder owns the order of things, not what each instruction does. For every step
(``Builder._step``) it prints ``STEP n/N: ...``, makes the step's :class:`~builder.step.StepContext`
and calls the instruction's life cycle uniformly (:mod:`builder.instructions`): ``prepare`` (variables
substituted, what the step reads resolved), the cache key from the prepared step's text
(:mod:`builder.cache`); on a hit, the recorded layer and history line are reused; on a miss, the step
``execute``s (RUN, COPY, ADD and WORKDIR make a layer directory, which the store turns into a layer:
:mod:`builder.running`, :mod:`builder.copying`, :mod:`builder.workspace`) and the result is recorded;
then ``update_config``. A step that makes no files adds no layer: its history entry says
``empty_layer``, like metadata-only instructions. Only the target stage and the stages it needs
(``FROM stage``, ``COPY --from``, ``RUN --mount from=``) are built.

Resource handling: every temporary directory lives under the store's ``tmp/`` and is removed when
its step ends, whether it succeeded or not.

Error handling: a malformed Dockerfile raises :class:`DockerfileError` before anything runs; a step
that fails raises :class:`BuildError` naming its ``Dockerfile:N`` (a RUN exiting non-zero: ``The
command '...' returned a non-zero code: N``); SIGINT or SIGTERM stops the build, a running RUN
included, with :class:`BuildInterrupted` (see :mod:`builder.interruption`). Nothing is tagged and no
image is recorded unless every step succeeded; layers of the steps that did succeed stay in the store
as cache.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import errno
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from builder import dockerfile as df
from builder.cache import BuildCache, chain_key
from builder.context import BuildContext
from builder.copying import copy_into_layer, make_workdir
from builder.dockerignore import IgnoreRules
from builder.fsops import LayerView
from builder.interruption import BuildInterrupted, Interrupt, Interruption
from builder.remote import Downloads
from builder.session import Session
from builder.shellwords import Lexer
from builder.step import BuildServices, Source, StepContext
from builder.variables import BuildArgs, FixedScope, StageScope, foreign_platform
from builder.workspace import Workspace
from lamina.errors import BuildError, DockerfileError, ImageNotFound, LaminaError
from lamina.store.compression import mount_point
from unionfs.core.stack import LayerStack

if TYPE_CHECKING:
    from builder.cache_config import CacheRecord
    from builder.registry_cache import CacheSource, CacheTarget, ImportedCache
    from lamina.store import Image, Layer, Store

log = logging.getLogger(__name__)

BUILD_COMMENT = "lamina build"


@dataclass
class BuildOptions:
    context: Path
    dockerfile_text: str
    dockerfile_path: Path | None  # None when read from stdin
    dockerfile_name: str = "Dockerfile"
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    pull: bool = False
    network: str = "default"  # --network: RUN steps' default network (default, none or host)
    ulimits: tuple[tuple[str, int, int], ...] = ()  # --ulimit: (name, soft, hard) of every RUN step
    labels: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    session: Session = field(default_factory=Session)  # --secret and --ssh
    cache_from: list[CacheSource] = field(default_factory=list)
    cache_to: list[CacheTarget] = field(default_factory=list)


class Output:
    """docker/podman-like progress on a stream; quiet mode prints nothing (RUN output is captured
    and shown only when the step fails)."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet

    def line(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"
# BuildKit's switch for an inline cache (``--cache-to type=inline``), read from the build-args.
INLINE_CACHE_ARG = "BUILDKIT_INLINE_CACHE"


def source_date_epoch(build_args: dict[str, str]) -> int | None:
    """The build's ``SOURCE_DATE_EPOCH`` (a build-arg, as BuildKit reads it; ``lamina build`` passes
    the environment's), or None. With it, history and image times are that moment, and no file of a
    layer the build writes is newer (see docs/builder.md, "Reproducible images")."""
    text = build_args.get(SOURCE_DATE_EPOCH, "")
    if not text:
        return None
    if not text.isdigit() or len(text) > 12:
        raise BuildError(f"--build-arg {SOURCE_DATE_EPOCH}={text}: expected a number of seconds since "
                         "1970-01-01")
    return int(text)


@dataclass
class StageState:
    """A stage while (and after) it is built."""

    stage: df.Stage
    layers: list[Layer]
    image: df.ImageConfig
    base_config: dict[str, Any]  # the base image's full OCI config (architecture, os, history...)
    history: list[dict[str, Any]]
    scope: StageScope
    key: str
    base: Image | None

    def view(self) -> LayerView:
        return LayerView(LayerStack.from_bottom_up(layer.path for layer in self.layers))

    def step_context(self, services: BuildServices) -> StepContext:
        return StepContext(stage_name=self.stage.name, stage_index=self.stage.index, layers=tuple(self.layers),
                           image=self.image, scope=self.scope, services=services)

    def full_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {k: v for k, v in self.base_config.items()
                               if k not in ("rootfs", "history", "config", "created", "author")}
        container_config = {k: v for k, v in self.image.config.items() if v not in (None, {}, [])}
        cfg["config"] = container_config
        if self.image.author:
            cfg["author"] = self.image.author
        elif self.base_config.get("author"):
            cfg["author"] = self.base_config["author"]
        cfg["history"] = self.history
        cfg["created"] = self.history[-1]["created"] if self.history else _now()
        return cfg


class Builder:
    """Builds one Dockerfile into one image. Use :func:`build` unless you need the pieces."""

    def __init__(self, store: Store, options: BuildOptions, stream: TextIO | None = None) -> None:
        self.store = store
        self.options = options
        self.out = Output(stream or sys.stdout, options.quiet)
        self.cache = BuildCache(store.layout.build_cache)
        ignore = IgnoreRules.for_build(options.context, options.dockerfile_path)
        self.context = BuildContext(options.context, ignore, self.cache.stat_cache_path)
        self.states: dict[int, StageState] = {}
        self.step_number = 0
        self.total_steps = 0
        self.dockerfile: df.Dockerfile | None = None
        self.pulled: set[str] = set()  # references already pulled by this build (--pull)
        self.imported: ImportedCache | None = None  # --cache-from
        # Every step of this build as (stage index, key, cache entry): what --cache-to exports.
        self.steps_done: list[tuple[int, str, dict[str, Any]]] = []
        self.from_stage: dict[int, int] = {}  # stage index -> the stage it is built FROM
        self.interruption = Interruption()
        self.epoch = source_date_epoch(options.build_args)
        self.workspace = Workspace(store, self.interruption, self.epoch, say=self.out.line)
        self.services = BuildServices(
            context=self.context, cache=self.cache, workspace=self.workspace,
            downloads=Downloads(self.workspace), interruption=self.interruption, session=options.session,
            sources=self.source, run=_run_step, copy=copy_into_layer, make_workdir=make_workdir,
            quiet=options.quiet, epoch=self.epoch, network=options.network, ulimits=options.ulimits)

    # --- top level ---------------------------------------------------------------------------
    def build(self) -> Image:
        if not self.options.context.is_dir():
            raise BuildError(f"build context {self.options.context} is not a directory")
        parsed = df.parse(self.options.dockerfile_text, self.options.dockerfile_name)
        self.dockerfile = parsed
        self.lexer = Lexer(parsed.directives.escape)
        self.build_args = BuildArgs(self.options.build_args, self.lexer)
        for arg in parsed.global_args:
            self.build_args.declare_global(arg)
        target = parsed.stage(self.options.target) if self.options.target else parsed.stages[-1]
        needed = self._needed_stages(parsed, target)
        self.total_steps = sum(1 + len(s.instructions) for s in needed)
        # Layers made or reused by the steps are referenced by nothing but the cache until the image
        # is recorded: the shared store lock keeps `rmi`/`prune` from collecting them meanwhile.
        with self.store.lock(shared=True), contextlib.ExitStack() as resources:
            if self.options.cache_from and not self.options.no_cache:
                from builder.registry_cache import open_imports

                self.imported = resources.enter_context(
                    open_imports(self.store, self.options.cache_from, self.out.line))
            for stage in needed:
                self.states[stage.index] = self._build_stage(stage)
            final = self.states[target.index]
            unused = [name for name in self.build_args.unused()
                      if name not in (SOURCE_DATE_EPOCH, INLINE_CACHE_ARG)]
            if unused:
                self.out.line(f"[Warning] one or more build-args {unused} were not consumed")
            self.interruption.commit()
            image = self._commit(final)
            self._export_cache(target.index)
            return image

    def _needed_stages(self, parsed: df.Dockerfile, target: df.Stage) -> list[df.Stage]:
        """The target and, transitively, the stages it refers to (names expanded with global ARGs)."""
        names = {s.name: s for s in parsed.stages if s.name}
        globals_ = self.build_args.global_variables()

        def refers(stage: df.Stage) -> list[df.Stage]:
            refs = [ref for inst in (stage.from_, *stage.instructions) for ref in inst.stage_refs()]
            found = []
            for ref in refs:
                try:
                    value = self.lexer.process_word(ref, globals_).lower()
                except LaminaError:
                    continue
                if value in names and names[value].index < stage.index:
                    found.append(names[value])
                elif value.isdigit() and int(value) < stage.index:
                    found.append(parsed.stages[int(value)])
            return found

        needed: dict[int, df.Stage] = {}
        pending = [target]
        while pending:
            stage = pending.pop()
            if stage.index in needed:
                continue
            needed[stage.index] = stage
            pending.extend(refers(stage))
        return [needed[i] for i in sorted(needed)]

    def _commit(self, state: StageState) -> Image:
        config = state.full_config()
        if self._inline_cache():
            from builder.registry_cache import INLINE_KEY, inline_metadata

            config[INLINE_KEY] = inline_metadata(self._cache_records(state.stage.index, "min"))
        if self.options.labels:
            labels = dict(config["config"].get("Labels") or {})
            labels.update(self.options.labels)
            config["config"]["Labels"] = labels
        tags = list(self.options.tags)
        if state.base is not None:
            from lamina.lazy.fill import fill_now

            fill_now(self.store.layout, state.base.id)  # a lazy base's layers must be in the store
        image = self.store.create_image(list(state.layers), config, tags=tags, base=state.base)
        self.out.line(f"COMMIT {' '.join(tags)}".rstrip())
        self.out.line(f"--> {image.short_id}")
        from lamina.store import Reference

        for tag in tags:
            self.out.line(f"Successfully tagged {Reference.parse(tag).familiar}")
        return image

    # --- the shared cache (--cache-to) -------------------------------------------------------
    def _inline_cache(self) -> bool:
        flag = self.options.build_args.get(INLINE_CACHE_ARG, "")
        return flag.lower() in ("1", "true") or any(t.kind == "inline" for t in self.options.cache_to)

    def _cache_records(self, target: int, mode: str) -> list[CacheRecord]:
        """The steps ``--cache-to`` exports: with mode ``min`` those of the target stage and the
        stages it is built FROM (the image's own), with ``max`` every stage's."""
        from builder.cache_config import CacheRecord

        stages = set(self.states)
        if mode == "min":
            stages, index = set(), target
            while True:
                stages.add(index)
                if index not in self.from_stage:
                    break
                index = self.from_stage[index]
        records = []
        for stage, key, entry in self.steps_done:
            if stage in stages:
                layer = entry.get("layer")
                size = self.store.blobs.size(layer["digest"]) if isinstance(layer, dict) else 0
                records.append(CacheRecord.from_entry(key, entry, size))
        return records

    def _export_cache(self, target: int) -> None:
        from builder.registry_cache import export

        for cache_to in self.options.cache_to:
            if cache_to.kind != "registry":
                continue
            records = self._cache_records(target, cache_to.mode)
            self.out.line(f"Exporting cache to {cache_to.ref} ({len(records)} steps, mode={cache_to.mode})")
            try:
                digest = export(self.store, cache_to, records)
            except (LaminaError, OSError) as e:
                message = f"--cache-to {cache_to.ref}: {str(e) or type(e).__name__}"
                if not cache_to.ignore_error:
                    raise BuildError(message) from None
                self.out.line(f"[Warning] {message}")
                continue
            self.out.line(f"--> {digest}")

    # --- stages ------------------------------------------------------------------------------
    def _announce(self, text: str) -> None:
        self.step_number += 1
        self.out.line(f"STEP {self.step_number}/{self.total_steps}: {text}")

    def _build_stage(self, stage: df.Stage) -> StageState:
        from_ = stage.from_
        self._announce(from_.text)
        base_ref = from_.resolve(FixedScope(self.lexer, self.build_args.global_variables()))
        if base_ref.platform is not None and (problem := foreign_platform(base_ref.platform)) is not None:
            raise from_.error(f"FROM --platform: {problem}")
        image_ref = base_ref.image
        base: Image | None = None
        parent_state: StageState | None = None
        if image_ref.lower() == "scratch":
            base_config: dict[str, Any] = {}
            layers: list[Layer] = []
            key = chain_key("", "FROM scratch")
        else:
            parent_state = self.stage_by_name(image_ref, before=stage.index)
            if parent_state is not None:
                self.from_stage[stage.index] = parent_state.stage.index
                base_config = parent_state.full_config()
                layers = list(parent_state.layers)
                key = chain_key(parent_state.key, f"FROM stage {image_ref}")
                base = parent_state.base
            else:
                base = self.base_image(image_ref, from_)
                base_config = copy.deepcopy(base.config)
                layers = list(base.layers)
                key = chain_key("", f"FROM image {base.id}")
        if self.epoch is not None:
            # Layers and times depend on it: a build with another epoch (or none) is another chain.
            key = chain_key(key, f"{SOURCE_DATE_EPOCH}={self.epoch}")
        container_config = copy.deepcopy(base_config.get("config") or {})
        triggers = container_config.pop("OnBuild", None) or []
        shell = container_config.get("Shell") or list(df.DEFAULT_SHELL)
        image = df.ImageConfig(config=container_config, shell=list(shell))
        image.ensure_path()
        state = StageState(stage=stage, layers=layers, image=image, base_config=base_config,
                           history=list(copy.deepcopy(base_config.get("history") or [])),
                           scope=StageScope(self.build_args, image), key=key, base=base)
        if base is not None and parent_state is None:
            self.out.line(f"--> {base.short_id}")
        self.total_steps += len(triggers)
        for number, trigger in enumerate(triggers):
            inst = df.parse_trigger(trigger, f"{image_ref} (ONBUILD trigger {number + 1})", from_.line)
            self._step(state, inst, label=f"ONBUILD {trigger}")
        for inst in stage.instructions:
            self._step(state, inst)
        return state

    def stage_by_name(self, name: str, before: int) -> StageState | None:
        assert self.dockerfile is not None
        lowered = name.lower()
        for stage in self.dockerfile.stages:
            if stage.index < before and (stage.name == lowered or str(stage.index) == lowered):
                return self.states.get(stage.index) or self._late_stage(stage)
        return None

    def _late_stage(self, stage: df.Stage) -> StageState:
        # A stage referred to by a name only known after substitution: build it now.
        state = self._build_stage(stage)
        self.states[stage.index] = state
        return state

    def source(self, ref: str, before: int, where: df.Instruction) -> Source:
        """Another stage's files (by name or index, before ``before``), else an image's."""
        state = self.stage_by_name(ref, before)
        if state is not None:
            return Source(state.view(), state.key)
        image = self.base_image(ref, where)
        return Source(LayerView(LayerStack.from_bottom_up(layer.path for layer in image.layers)), image.id)

    def base_image(self, ref: str, where: df.Instruction) -> Image:
        if self.options.pull and ref not in self.pulled:
            self.pulled.add(ref)
            try:
                pulled = self._pull(ref)
            except LaminaError as e:
                try:
                    local = self.store.resolve_image(ref)
                except ImageNotFound:
                    raise where.error(f"cannot pull {ref!r}: {e}") from None
                # An image that exists only locally (lamina/busybox, an import) is used as it is.
                self.out.line(f"[Warning] --pull: cannot pull {ref} ({e}); using the local image")
                return local
            if pulled is not None:
                return pulled
        try:
            return self.store.resolve_image(ref)
        except ImageNotFound:
            pass
        lazy = self._lazy_base(ref)
        if lazy is not None:
            return lazy
        try:
            pulled = self._pull(ref)
        except LaminaError as e:
            raise where.error(f"base image {ref!r} is not in the store and cannot be pulled: {e}") from None
        if pulled is not None:
            return pulled
        raise where.error(f"base image {ref!r} is not in the store (try `lamina pull {ref}` or "
                          "`lamina import`)")

    def _lazy_base(self, ref: str) -> Image | None:
        """An eStargz base image read lazily (lamina.lazy), as ``run`` does; None to pull it."""
        from lamina.lazy.lower import lazy_base_image

        try:
            return lazy_base_image(self.store.layout, ref)
        except LaminaError as e:
            log.debug("%s: not run lazily (%s)", ref, e)  # the pull that follows says why, or succeeds
            return None

    def _pull(self, ref_text: str) -> Image | None:
        """Pull through the store's registry client; None when the reference is not pullable."""
        try:
            from lamina.store import Reference
            from lamina.store.registry import RegistryClient
            from lamina.store.registry_auth import lookup_credentials
            from lamina.store.transfer import Progress, api_host, default_tls_verify, pull_image
        except ImportError:
            return None
        try:
            ref = Reference.parse(ref_text)
        except LaminaError:
            return None
        stream = sys.stderr if not self.options.quiet and sys.stderr.isatty() else None
        with RegistryClient(api_host(ref.registry), tls_verify=default_tls_verify(ref.registry),
                            credentials=lookup_credentials(ref.registry)) as client:
            return pull_image(self.store, ref, client, Progress(stream))

    # --- steps -------------------------------------------------------------------------------
    def _step(self, state: StageState, inst: df.Instruction, label: str | None = None) -> None:
        """Run one instruction. Every error it ends in names the instruction's ``Dockerfile:N``."""
        self._announce(label or inst.text)
        try:
            self._step_unlocated(state, inst)
        except DockerfileError:
            raise
        except LaminaError as e:
            if str(e).startswith(f"{inst.file}:"):
                raise
            located = inst.error(str(e))
            located.exit_code = e.exit_code
            raise located from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise inst.error(f"no space left on {mount_point(self.store.root)}") from None
            where = f": {e.filename}" if e.filename else ""
            raise inst.error(f"{e.strerror or e}{where}") from None
        finally:
            if self.services.downloads.pending:
                with self.interruption.deferred():
                    self.services.downloads.release()

    def _step_unlocated(self, state: StageState, inst: df.Instruction) -> None:
        ctx = state.step_context(self.services)
        step = inst.prepare(ctx)
        key = chain_key(state.key, step.cache_text())
        entry = self.cache.get(key)
        layer = self._cached_layer(entry) if entry is not None else None
        usable = entry is not None and (layer is not None or entry.get("layer") is None)
        if not usable and self.imported is not None:
            entry = self._imported_entry(key)
            layer = self._cached_layer(entry) if entry is not None else None
            usable = entry is not None and (layer is not None or entry.get("layer") is None)
        if usable and not self.options.no_cache:
            assert entry is not None
            history = entry["history"]
            done = entry
            self.out.line("--> CACHED")
        else:
            created = _now() if self.epoch is None else _rfc3339(self.epoch)
            layer = step.execute(ctx)
            history = {"created": created, "created_by": step.created_by(), "comment": BUILD_COMMENT}
            if layer is None:
                history["empty_layer"] = True
            # Sorted, as the cache stores it: a cached rebuild then yields the same image ID.
            history = dict(sorted(history.items()))
            record: dict[str, Any] = {"history": history, "layer": None}
            if layer is not None:
                record["layer"] = {"diff_id": layer.diff_id, "digest": layer.digest, "size": layer.size,
                                   "media_type": layer.media_type}
            # --no-cache only means "do not use": an entry other builds use stays as it is.
            if not usable:
                with self.interruption.deferred():
                    self.cache.put(key, record)
            done = record
            self.out.line(f"--> {(layer.diff_id.removeprefix('sha256:') if layer else key)[:12]}")
        self.steps_done.append((state.stage.index, key, done))
        step.update_config(state.image)
        if layer is not None:
            state.layers.append(layer)
        state.history.append(history)
        # The next steps depend on what this one produced, not only on what it said: a step that ran
        # again and made different files (a RUN is not always reproducible) invalidates the steps
        # after it, as docker's parent-image rule does.
        state.key = chain_key(key, f"layer {layer.diff_id}") if layer is not None else key

    def _imported_entry(self, key: str) -> dict[str, Any] | None:
        """The entry of an imported cache for ``key``, its layer now in the store and the entry in
        the local cache; None when no import has it or its layer cannot be fetched."""
        assert self.imported is not None
        found = self.imported.lookup(key)
        if found is None or not self.imported.fetch(found):
            return None
        entry = found.entry()
        with self.interruption.deferred():
            self.cache.put(key, entry)
        return entry

    def _cached_layer(self, entry: dict[str, Any]) -> Layer | None:
        info = entry.get("layer")
        if not isinstance(info, dict):
            return None
        from lamina.store import Layer

        diff_id = info.get("diff_id", "")
        digest = info.get("digest", "")
        if not (self.store.has_layer(diff_id) and self.store.has_blob(digest)):
            return None
        return Layer(diff_id=diff_id, digest=digest, path=self.store.layer_dir(diff_id),
                     size=int(info.get("size", 0)), media_type=info.get("media_type") or
                     "application/vnd.oci.image.layer.v1.tar+gzip")


def _run_step(step: df.RunStep, ctx: StepContext) -> Layer | None:
    # The sandbox's code is loaded only by a build that runs a command (not by a cached rebuild).
    from builder import running

    return running.run_step(step, ctx)


def build(store: Store, options: BuildOptions, stream: TextIO | None = None) -> Image:
    """Build ``options`` into ``store``; return the image. See the module docstring for errors.

    Resource handling: every temporary directory of the build is gone when this returns or raises."""
    builder = Builder(store, options, stream)
    try:
        with builder.interruption.installed():
            try:
                return builder.build()
            finally:
                with builder.interruption.deferred():
                    builder.workspace.cleaner.wait()
    except Interrupt as e:
        where = f" at step {builder.step_number}/{builder.total_steps}" if builder.step_number else ""
        raise BuildInterrupted(e.signum, where) from None
