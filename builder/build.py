"""``lamina build``: a parsed Dockerfile to an image in the store, one step at a time.

The life cycle of every step (``Builder._step``): print ``STEP n/N: ...``; ``expand`` the
instruction's variables in the stage's scope; compute its cache key (:mod:`builder.cache`); on a hit,
reuse the recorded layer and history line; on a miss, ``execute`` it (RUN, COPY, ADD and WORKDIR
make a layer directory, which :meth:`Store.commit_layer` turns into a layer) and record the result;
then ``update_config``. Only the target stage and the stages it needs (``FROM stage``,
``COPY --from``, ``RUN --mount from=``) are built.

Layers: RUN runs in the runner's sandbox over a union mount whose lowers are the layers so far and
whose upper is a fresh directory; that upper, minus the empty mount points the sandbox made for
``--mount`` targets, is the layer (cleaned and packed as root of lamina's user namespace, since the
command may have made files owned by subordinate ids). COPY and ADD write the new files straight
into a fresh directory (see :mod:`builder.copying` and :mod:`builder.fsops`). A step whose directory ends up empty adds no layer: its history entry
says ``empty_layer``, like metadata-only instructions.

Resource handling: every temporary directory lives under the store's ``tmp/`` and is removed when
its step ends, whether it succeeded or not.

Error handling: a malformed Dockerfile raises :class:`DockerfileError` before anything runs; a step
that fails raises :class:`BuildError` (a RUN exiting non-zero: ``The command '...' returned a
non-zero code: N``); SIGINT or SIGTERM stops the build, a running RUN included, with
:class:`BuildInterrupted` (see :mod:`builder.interruption`). Nothing is tagged and no image is
recorded unless every step succeeded; layers of the steps that did succeed stay in the store as cache.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import posixpath
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from builder import dockerfile as df
from builder.cache import BuildCache, chain_key
from builder.context import BuildContext
from builder.copying import copy_digest, copy_into_layer, new_dir_time_ns, resolve_user
from builder.dockerignore import IgnoreRules
from builder.fsops import (
    LayerView,
    Ownership,
    clamp_times,
    copy_view_entry,
    ensure_parents,
    prune_empty_dirs,
    resolve_dir_in_image,
    settle_dir_times,
)
from builder.interruption import BuildInterrupted, Interrupt, Interruption
from builder.remote import Download
from builder.remote import release as release_downloads
from builder.session import Session, secret_mount, ssh_mount
from builder.shellwords import Lexer
from builder.variables import BuildArgs, FixedScope, StageScope, foreign_platform
from lamina.errors import (
    BuildError,
    CommandNotFound,
    CommandNotInvokable,
    DockerfileError,
    ImageNotFound,
    LaminaError,
)
from lamina.store.compression import mount_point
from unionfs.core.stack import LayerStack

if TYPE_CHECKING:
    from lamina.store import Image, Layer, Store
    from runner.sandbox import SandboxSpec

log = logging.getLogger(__name__)

BUILD_COMMENT = "lamina build"
# Where a RUN step of a single-id build finds its APT configuration (a tmpfs, never in a layer).
APT_CONFIG_PATH = "/dev/lamina-apt.conf"


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
    labels: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    session: Session = field(default_factory=Session)  # --secret and --ssh


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
        self.cache = BuildCache(store.root / "build-cache")
        ignore = IgnoreRules.for_build(options.context, options.dockerfile_path)
        self.context = BuildContext(options.context, ignore, self.cache.stat_cache_path)
        self.states: dict[int, StageState] = {}
        self.step_number = 0
        self.total_steps = 0
        self.dockerfile: df.Dockerfile | None = None
        self.pulled: set[str] = set()  # references already pulled by this build (--pull)
        self.cleaner = _Cleaner()
        self.interruption = Interruption()
        self.epoch = source_date_epoch(options.build_args)
        self.downloads: dict[str, Download] = {}  # ADD URL: fetched once per step (builder.remote)
        self.download_dirs: list[Path] = []

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
        with self.store.lock(shared=True):
            for stage in needed:
                self.states[stage.index] = self._build_stage(stage)
            final = self.states[target.index]
            unused = [name for name in self.build_args.unused() if name != SOURCE_DATE_EPOCH]
            if unused:
                self.out.line(f"[Warning] one or more build-args {unused} were not consumed")
            self.interruption.commit()
            return self._commit(final)

    def _needed_stages(self, parsed: df.Dockerfile, target: df.Stage) -> list[df.Stage]:
        """The target and, transitively, the stages it refers to (names expanded with global ARGs)."""
        names = {s.name: s for s in parsed.stages if s.name}
        globals_ = self.build_args.global_variables()

        def refers(stage: df.Stage) -> list[df.Stage]:
            refs: list[str] = [stage.from_.image_text]
            for inst in stage.instructions:
                if isinstance(inst, df.Copy) and inst.from_stage is not None:
                    refs.append(inst.from_stage)
                if isinstance(inst, df.Run):
                    refs.extend(m.from_ for m in inst.mounts if m.from_)
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
        if self.options.labels:
            labels = dict(config["config"].get("Labels") or {})
            labels.update(self.options.labels)
            config["config"]["Labels"] = labels
        tags = list(self.options.tags)
        image = self.store.create_image(list(state.layers), config, tags=tags, base=state.base)
        self.out.line(f"COMMIT {' '.join(tags)}".rstrip())
        self.out.line(f"--> {image.short_id}")
        from lamina.store import Reference

        for tag in tags:
            self.out.line(f"Successfully tagged {Reference.parse(tag).familiar}")
        return image

    # --- stages ------------------------------------------------------------------------------
    def _announce(self, text: str) -> None:
        self.step_number += 1
        self.out.line(f"STEP {self.step_number}/{self.total_steps}: {text}")

    def _build_stage(self, stage: df.Stage) -> StageState:
        from_ = stage.from_
        self._announce(from_.text)
        from_.expand(FixedScope(self.lexer, self.build_args.global_variables()))
        if from_.platform is not None and (problem := foreign_platform(from_.platform)) is not None:
            raise from_.error(f"FROM --platform: {problem}")
        image_ref = from_.image
        base: Image | None = None
        parent_state: StageState | None = None
        if image_ref.lower() == "scratch":
            base_config: dict[str, Any] = {}
            layers: list[Layer] = []
            key = chain_key("", "FROM scratch")
        else:
            parent_state = self.stage_by_name(image_ref, before=stage.index)
            if parent_state is not None:
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
        try:
            pulled = self._pull(ref)
        except LaminaError as e:
            raise where.error(f"base image {ref!r} is not in the store and cannot be pulled: {e}") from None
        if pulled is not None:
            return pulled
        raise where.error(f"base image {ref!r} is not in the store (try `lamina pull {ref}` or "
                          "`lamina import`)")

    def _pull(self, ref_text: str) -> Image | None:
        """Pull through the store's registry client; None when the reference is not pullable."""
        try:
            from lamina.store import Reference
            from lamina.store.registry import RegistryClient
            from lamina.store.registry_auth import lookup_credentials
            from lamina.store.registry_commands import Progress, api_host, default_tls_verify, pull_image
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
            if self.download_dirs:
                with self.interruption.deferred():
                    release_downloads(self)

    def _step_unlocated(self, state: StageState, inst: df.Instruction) -> None:
        inst.expand(state.scope)
        if isinstance(inst, df.Arg):
            state.scope.declare(inst)
        elif isinstance(inst, df.Run):
            inst.resolve_argv(state.image)
        elif isinstance(inst, (df.Cmd, df.Entrypoint)):
            inst.argv = inst.resolve(state.image)
        elif isinstance(inst, (df.Copy, df.Add)):
            inst.content_digest = copy_digest(self, state, inst)
        key = chain_key(state.key, inst.cache_text())
        entry = self.cache.get(key)
        layer = self._cached_layer(entry) if entry is not None else None
        usable = entry is not None and (layer is not None or entry.get("layer") is None)
        if usable and not self.options.no_cache:
            assert entry is not None
            history = entry["history"]
            self.out.line("--> CACHED")
        else:
            created = _now() if self.epoch is None else _rfc3339(self.epoch)
            layer = self._execute(state, inst) if inst.makes_layer else None
            history = {"created": created, "created_by": self._created_by(inst), "comment": BUILD_COMMENT}
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
            self.out.line(f"--> {(layer.diff_id.removeprefix('sha256:') if layer else key)[:12]}")
        inst.update_config(state.image)
        if layer is not None:
            state.layers.append(layer)
        state.history.append(history)
        # The next steps depend on what this one produced, not only on what it said: a step that ran
        # again and made different files (a RUN is not always reproducible) invalidates the steps
        # after it, as docker's parent-image rule does.
        state.key = chain_key(key, f"layer {layer.diff_id}") if layer is not None else key

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

    @staticmethod
    def _created_by(inst: df.Instruction) -> str:
        if isinstance(inst, df.Run):
            # As docker shows it: the shell form joined, the exec form as JSON.
            return "RUN " + (" ".join(inst.argv) if inst.exec_form is None else json.dumps(inst.argv))
        return inst.text

    def _execute(self, state: StageState, inst: df.Instruction) -> Layer | None:
        with self._temp_dir("step") as tmp:
            diff = tmp / "diff"
            diff.mkdir()
            if isinstance(inst, df.Run):
                return self._run(state, inst, tmp, diff)
            # Only the build's own user writes here: no files of subordinate ids to worry about.
            self.cleaner.mark_plain(tmp)
            if isinstance(inst, df.Workdir):
                path = inst.resolve(state.image)
                view = state.view()
                if view.exists_as_dir(path):
                    return None
                owner = resolve_user(view, state.image.user) if state.image.user else (0, 0)
                resolved = resolve_dir_in_image(view, path)
                ensure_parents(str(diff), view, resolved, new_owner=owner)
                settle_dir_times(str(diff), view, resolved, new_dir_time_ns(self.epoch))
            elif isinstance(inst, (df.Copy, df.Add)):
                copy_into_layer(self, state, inst, tmp, diff)
            if not any(diff.iterdir()) and not _is_opaque(diff):
                return None
            if self.epoch is not None:
                clamp_times(str(diff), self.epoch)
            with self.interruption.deferred():
                return self.store.commit_layer(diff)

    @contextmanager
    def _temp_dir(self, kind: str) -> Iterator[Path]:
        tmp_root = self.store.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.build-{kind}.", dir=tmp_root))
        try:
            yield path
        finally:
            with self.interruption.deferred():
                self.cleaner.remove(path)

    # --- RUN ---------------------------------------------------------------------------------
    def _run(self, state: StageState, inst: df.Run, tmp: Path, upper: Path) -> Layer | None:
        from runner.sandbox import Mount, SandboxSpec

        if not state.layers:
            # What runc answers there (BuildKit: "exec: "/bin/sh": stat /bin/sh: no such file").
            raise inst.error(f"{(inst.argv or ['/bin/sh'])[0]}: no such file or directory "
                             "(the stage is FROM scratch and has no files yet)")
        work = tmp / "work"
        work.mkdir()
        mounts: list[Mount] = []
        env = state.scope.run_environment()
        agents = 0
        for m in inst.mounts:
            if m.type in ("secret", "ssh") and m.target:
                # As every mount's target: relative to WORKDIR.
                m = dataclasses.replace(m, target=posixpath.join(state.image.workdir, m.target))
            if m.type == "secret":
                found = secret_mount(m, self.options.session, tmp, env, Mount)
            elif m.type == "ssh":
                found = ssh_mount(m, agents == 0, self.options.session, env, Mount)
                agents += 1
            else:
                found = self._run_mount(state, m, tmp, Mount)
            if found is not None:
                mounts.append(found)
        if inst.script is not None:
            scripts = tmp / "pipes"
            scripts.mkdir()
            script = scripts / inst.script.name
            script.write_text(inst.script.body)
            script.chmod(0o755)
            scripts.chmod(0o755)
            mounts.append(Mount(target="/dev/pipes", source=scripts, readonly=True))
        for number, volume in enumerate(state.image.config.get("Volumes") or {}):
            # As docker's builder: a declared VOLUME is an anonymous volume in later RUN steps. Its
            # directory exists (seeded from the image) and what RUN writes there is not kept.
            source = tmp / "volumes" / str(number)
            source.mkdir(parents=True)
            mounts.append(Mount(target=volume, kind="volume", source=source))
        if _single_id_mapping() and "APT_CONFIG" not in env:
            # With only one id mapped, APT's privilege drop to _apt (setgroups/seteuid) cannot work
            # and apt-get fails. Tell APT not to sandbox, through a config file mounted for this step
            # only (the image is not changed; its own apt.conf is still read through #include).
            apt_conf = tmp / "apt.conf"
            apt_conf.write_text('APT::Sandbox::User "root";\n'
                                + ('#include "/etc/apt/apt.conf";\n'
                                   if state.view().lookup("/etc/apt/apt.conf") else ""))
            apt_conf.chmod(0o644)
            mounts.append(Mount(target=APT_CONFIG_PATH, source=apt_conf, readonly=True))
            env["APT_CONFIG"] = APT_CONFIG_PATH
        # A signal from here on kills the command (or cancels its start) and ends the step once the
        # sandbox is gone: see builder.interruption.
        with self.interruption.deferred():
            capture = None
            if self.out.quiet:
                capture = open(tmp / "output", "w+b")
            try:
                spec = SandboxSpec(
                    argv=list(inst.argv),
                    lowers=LayerStack.from_bottom_up(layer.path for layer in state.layers),
                    upper=upper, work=work,
                    env=env,
                    cwd=state.image.workdir,
                    user=state.image.user or "0",
                    network="none" if inst.network == "none" else "host",
                    mounts=mounts,
                    stdout=capture.fileno() if capture else None,
                    stderr=capture.fileno() if capture else None,
                    state_dir=_sandbox_dir(tmp),  # in the store: a killed build's is swept
                )
                sys.stdout.flush()
                code = self._run_command(spec)
                if code != 0:
                    if capture is not None:
                        capture.seek(0)
                        sys.stderr.write(capture.read().decode("utf-8", "replace"))
                    command = " ".join(inst.argv) if inst.exec_form is None else json.dumps(inst.argv)
                    raise BuildError(f"{inst.file}:{inst.line}: The command '{command}' returned a non-zero "
                                     f"code: {code}")
            finally:
                if capture is not None:
                    capture.close()
            # Mount points the sandbox created for --mount targets are scaffolding, not content.
            targets = [posixpath.join(state.image.workdir, m.target) for m in inst.mounts if m.target]
            if inst.script is not None:
                targets.append("/dev/pipes")
            lowers = LayerStack.from_bottom_up(layer.path for layer in state.layers)
            layer = self._commit_upper(lowers, upper, work, targets, self.epoch)
        # The upper and work directories are gone (removed in the user namespace); what is left of
        # the step's directory is the build's own.
        self.cleaner.mark_plain(tmp)
        return layer

    def _run_command(self, spec: SandboxSpec) -> int:
        """Run a RUN step's command in the sandbox; return its exit code. A signal cancels the
        sandbox's start, or kills the command once it runs (see :mod:`builder.interruption`)."""
        from runner.sandbox import start_sandbox

        try:
            sandbox = start_sandbox(spec, cancel=self.interruption.cancel_signal)
        except (CommandNotFound, CommandNotInvokable) as e:
            # docker reports these as the step's exit code, after the runtime's message.
            sys.stderr.write(f"{e}\n")
            return e.exit_code
        with self.interruption.stopping(sandbox):
            return sandbox.wait()

    def _commit_upper(self, lowers: LayerStack, upper: Path, work: Path, targets: list[str],
                      epoch: int | None) -> Layer | None:
        """Turn a RUN step's upper directory into a layer (None when the step changed nothing).

        Files the command made may belong to subordinate ids, which only root of lamina's user
        namespace can read: the upper is cleaned up and packed into a blob there, and the blob is
        unpacked into the store here, by the user (the store's ownership convention)."""
        from lamina.store import Layer
        from runner.sandbox import call_in_userns

        packed = call_in_userns(_finish_upper, self.store, lowers, upper, work, targets, epoch)
        if packed is None:
            return None
        digest, diff_id = packed
        diff_id, size = self.store.ensure_layer(digest, diff_id)
        return Layer(diff_id=diff_id, digest=digest, path=self.store.layer_dir(diff_id), size=size)

    def _run_mount(self, state: StageState, m: df.RunMount, tmp: Path, mount_cls: Any) -> Any:
        target = posixpath.join(state.image.workdir, m.target)
        if m.type == "tmpfs":
            return mount_cls(target=target, kind="tmpfs", options=f"size={m.size}" if m.size else "")
        if m.type == "cache":
            directory = self.cache.mount_dir(m.id or target)
            if not directory.exists():
                directory.mkdir(parents=True)
                os.chmod(directory, m.mode if m.mode is not None else 0o755)
                if (m.uid or m.gid) and os.geteuid() == 0:
                    os.chown(directory, m.uid or 0, m.gid or 0)
            return mount_cls(target=target, kind="cache", source=directory, readonly=m.readonly)
        # bind: from the context (default) or another stage/image; read-only unless rw, and then
        # writes go to a throw-away copy, as in docker.
        source_path = m.source or "/"
        if m.from_:
            src_state = self.stage_by_name(m.from_, before=state.stage.index)
            view = src_state.view() if src_state else LayerView(
                LayerStack.from_bottom_up(layer.path for layer in self.base_image(m.from_, state.stage.from_).layers))
            entry = view.lookup(source_path)
            if entry is None:
                raise BuildError(f"--mount from={m.from_}: {source_path} not found")
            copy_dest = tmp / f"mount-{len(os.listdir(tmp))}"
            copy_view_entry(view, entry.backing, entry.st, entry.lower_dirs, str(copy_dest),
                            Ownership(uid=None, gid=None))
            return mount_cls(target=target, source=copy_dest, readonly=m.readonly)
        rel = self.context.resolve(source_path)[0]
        host = Path(self.context.root) / rel if rel != "." else Path(self.context.root)
        if not m.readonly:
            copy_dest = tmp / f"mount-{len(os.listdir(tmp))}"
            if host.is_dir():
                shutil.copytree(host, copy_dest, symlinks=True)
            else:
                shutil.copy2(host, copy_dest)
            host = copy_dest
        return mount_cls(target=target, source=host, readonly=m.readonly)


def _sandbox_dir(step_dir: Path) -> Path:
    """The RUN sandbox's state (its /etc files, init layer and mount point), inside the step's
    temporary directory rather than /tmp."""
    path = step_dir / "sandbox"
    path.mkdir(mode=0o755)
    return path


def _single_id_mapping() -> bool:
    """True for an unprivileged user without subordinate ids (only container root is mapped)."""
    if os.geteuid() == 0:
        return False
    from runner.idmap import current_mapping

    return current_mapping().single


def _finish_upper(store: Store, lowers: LayerStack, upper: Path, work: Path,
                  targets: list[str], epoch: int | None) -> tuple[str, str] | None:
    """In lamina's user namespace: flatten redirects, drop scaffolding, pack the upper into a blob.
    Returns (blob digest, diff_id), or None for an empty upper."""
    from lamina.store.layer_pack import pack_layer
    from unionfs.export import flatten_redirects

    # A directory renamed over a lower one carries an overlay redirect, which a layer tar cannot
    # express: give it a full copy of what it showed instead (a no-op when nothing was renamed).
    flatten_redirects(lowers, upper, work)
    prune_empty_dirs(str(upper), targets, LayerView(lowers))
    try:
        if not any(upper.iterdir()) and not _is_opaque(upper):
            return None
        if epoch is not None:
            clamp_times(str(upper), epoch)
        with store.lock(shared=True), store.blobs.writer() as writer:
            result = pack_layer(upper, writer, compress=True)
        assert result.digest is not None
        return result.digest, result.diff_id
    finally:
        # Packed into the blob: the directories are not needed any more, and only this namespace
        # can delete what the command made.
        shutil.rmtree(upper, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _is_opaque(path: Path) -> bool:
    from unionfs.core import ondisk

    return ondisk.is_opaque_dir(str(path))


def _remove_tree(path: Path) -> None:
    from runner.sandbox import call_in_userns

    # What a RUN step made may belong to subordinate ids: delete it as root of the namespace.
    try:
        call_in_userns(shutil.rmtree, path, True)
    except LaminaError as e:
        log.info("could not remove %s in the user namespace: %s", path, e)
    if path.exists():
        from lamina.store.blobs import remove_tree

        try:
            remove_tree(path)
        except (OSError, TypeError) as e:
            log.info("could not remove %s: %s", path, e)


class _Cleaner:
    """Removes the temporary directories of finished steps.

    Deleting a step's files costs milliseconds per file on a busy disk, so as real root it happens
    on a worker thread while the next steps run (``unlink`` releases the GIL); the build waits for
    it before returning (:meth:`wait`). Unprivileged, a directory that may hold files of subordinate
    ids (a failed RUN's upper) needs a child process in lamina's user namespace, which is not forked
    from the worker thread: it is removed at once instead. Directories marked plain go to the
    worker for everyone."""

    def __init__(self) -> None:
        import queue
        import threading

        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._threading = threading
        self._plain: set[Path] = set()

    def mark_plain(self, path: Path) -> None:
        """``path`` holds only files of the build's own user: any process may delete it."""
        self._plain.add(path)

    def remove(self, path: Path) -> None:
        if os.geteuid() != 0 and path not in self._plain:
            _remove_tree(path)
            return
        self._plain.discard(path)
        if self._thread is None:
            self._thread = self._threading.Thread(target=self._work, name="lamina-build-cleaner", daemon=True)
            self._thread.start()
        self._queue.put(path)

    def _work(self) -> None:
        from lamina.store.blobs import remove_tree

        # Never fork from this thread (no user namespace here): only plain directories come here.
        while (path := self._queue.get()) is not None:
            try:
                remove_tree(path)
            except (OSError, TypeError) as e:
                log.info("could not remove %s: %s", path, e)

    def wait(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


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
                    builder.cleaner.wait()
    except Interrupt as e:
        where = f" at step {builder.step_number}/{builder.total_steps}" if builder.step_number else ""
        raise BuildInterrupted(e.signum, where) from None
