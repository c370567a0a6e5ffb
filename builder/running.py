"""RUN: a step's command in the runner's sandbox, over a union mount of the layers so far.

The mount's lowers are the stage's layers and its upper a fresh directory; that upper, minus the
empty mount points the sandbox made for ``--mount`` targets, becomes the step's layer (cleaned and
packed as root of lamina's user namespace, since the command may have made files owned by
subordinate ids: see :meth:`Workspace.commit_upper`). ``--mount`` sources: bind (the context, or
another stage or image, copied when writable), cache (a directory of the build cache), tmpfs,
secret and ssh (lent by the caller, :mod:`builder.session`). A VOLUME declared earlier is an
anonymous volume, as in docker's builder.

Error handling: a command exiting non-zero raises :class:`BuildError` with docker's words (``The
command '...' returned a non-zero code: N``), after the command's output when it was captured
(``--quiet``). A signal cancels the sandbox's start or kills the command (:mod:`builder.interruption`).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from builder.fsops import Ownership, copy_view_entry
from builder.session import secret_mount, ssh_mount
from lamina.errors import BuildError, CommandNotFound, CommandNotInvokable

if TYPE_CHECKING:
    from builder.layer_instructions import RunStep
    from builder.step import StepContext
    from builder.values import RunMount
    from lamina.store import Layer
    from runner.sandbox import Mount, SandboxSpec

# Where a RUN step of a single-id build finds its APT configuration (a tmpfs, never in a layer).
APT_CONFIG_PATH = "/dev/lamina-apt.conf"


def run_step(step: RunStep, ctx: StepContext) -> Layer | None:
    """Run ``step``'s command; the layer it made, None when it changed nothing."""
    if not ctx.layers:
        # What runc answers there (BuildKit: "exec: "/bin/sh": stat /bin/sh: no such file").
        raise step.error(f"{(step.argv or ('/bin/sh',))[0]}: no such file or directory "
                         "(the stage is FROM scratch and has no files yet)")
    workspace = ctx.services.workspace
    with workspace.temp_dir("step") as tmp:
        upper = tmp / "diff"
        upper.mkdir()
        work = tmp / "work"
        work.mkdir()
        env = ctx.scope.run_environment()
        mounts = _mounts(step, ctx, tmp, env)
        layer = _run_in_sandbox(step, ctx, tmp, upper, work, env, mounts)
        # The upper and work directories are gone (removed in the user namespace); what is left of
        # the step's directory is the build's own.
        workspace.cleaner.mark_plain(tmp)
        return layer


def _mounts(step: RunStep, ctx: StepContext, tmp: Path, env: dict[str, str]) -> list[Mount]:
    """The sandbox's mounts for the step (``env`` gets what secrets, agents and APT add)."""
    from runner.sandbox import Mount

    mounts: list[Mount] = []
    agents = 0
    workdir = ctx.image.workdir
    for m in step.mounts:
        if m.type in ("secret", "ssh") and m.target:
            # As every mount's target: relative to WORKDIR.
            m = dataclasses.replace(m, target=posixpath.join(workdir, m.target))
        if m.type == "secret":
            found = secret_mount(m, ctx.services.session, tmp, env, Mount)
        elif m.type == "ssh":
            found = ssh_mount(m, agents == 0, ctx.services.session, env, Mount)
            agents += 1
        else:
            found = _run_mount(m, step, ctx, tmp)
        if found is not None:
            mounts.append(found)
    if step.script is not None:
        scripts = tmp / "pipes"
        scripts.mkdir()
        script = scripts / step.script.name
        script.write_text(step.script.body)
        script.chmod(0o755)
        scripts.chmod(0o755)
        mounts.append(Mount(target="/dev/pipes", source=scripts, readonly=True))
    for number, volume in enumerate(ctx.image.config.get("Volumes") or {}):
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
                               if ctx.view().lookup("/etc/apt/apt.conf") else ""))
        apt_conf.chmod(0o644)
        mounts.append(Mount(target=APT_CONFIG_PATH, source=apt_conf, readonly=True))
        env["APT_CONFIG"] = APT_CONFIG_PATH
    return mounts


def _run_in_sandbox(step: RunStep, ctx: StepContext, tmp: Path, upper: Path, work: Path,
                    env: dict[str, str], mounts: list[Mount]) -> Layer | None:
    from runner.runflags import ULIMITS
    from runner.sandbox import SandboxSpec

    services = ctx.services
    # A signal from here on kills the command (or cancels its start) and ends the step once the
    # sandbox is gone: see builder.interruption.
    with services.interruption.deferred():
        capture = open(tmp / "output", "w+b") if services.quiet else None
        # As docker's builders: a step reads nothing, and the input piped to `build` stays for
        # whatever comes after it in the caller's pipeline.
        no_input = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            spec = SandboxSpec(
                argv=list(step.argv),
                lowers=ctx.lowers(),
                upper=upper, work=work,
                env=env,
                cwd=ctx.image.workdir,
                user=ctx.image.user or "0",
                network="none" if step.network == "none" else "host",
                ulimits=[(ULIMITS[name], soft, hard) for name, soft, hard in step.ulimits],
                mounts=mounts,
                stdin=no_input,
                stdout=capture.fileno() if capture else None,
                stderr=capture.fileno() if capture else None,
                state_dir=_sandbox_dir(tmp),  # in the store: a killed build's is swept
            )
            sys.stdout.flush()
            code = _run_command(spec, ctx)
            if code != 0:
                if capture is not None:
                    capture.seek(0)
                    sys.stderr.write(capture.read().decode("utf-8", "replace"))
                inst = step.instruction
                raise BuildError(f"{inst.file}:{inst.line}: The command '{step.command_text()}' returned a "
                                 f"non-zero code: {code}")
        finally:
            os.close(no_input)
            if capture is not None:
                capture.close()
        # Mount points the sandbox created for --mount targets are scaffolding, not content.
        targets = [posixpath.join(ctx.image.workdir, m.target) for m in step.mounts if m.target]
        if step.script is not None:
            targets.append("/dev/pipes")
        return services.workspace.commit_upper(ctx.lowers(), upper, work, targets)


def _run_command(spec: SandboxSpec, ctx: StepContext) -> int:
    """Run a RUN step's command in the sandbox; return its exit code. A signal cancels the
    sandbox's start, or kills the command once it runs (see :mod:`builder.interruption`)."""
    from runner.sandbox import start_sandbox

    interruption = ctx.services.interruption
    try:
        sandbox = start_sandbox(spec, cancel=interruption.cancel_signal)
    except (CommandNotFound, CommandNotInvokable) as e:
        # docker reports these as the step's exit code, after the runtime's message.
        sys.stderr.write(f"{e}\n")
        return e.exit_code
    with interruption.stopping(sandbox):
        return sandbox.wait()


def _run_mount(m: RunMount, step: RunStep, ctx: StepContext, tmp: Path) -> Mount:
    """A bind, cache or tmpfs ``--mount`` of the step."""
    from runner.sandbox import Mount

    target = posixpath.join(ctx.image.workdir, m.target)
    if m.type == "tmpfs":
        return Mount(target=target, kind="tmpfs", options=f"size={m.size}" if m.size else "")
    if m.type == "cache":
        directory = ctx.services.cache.mount_dir(m.id or target)
        if not directory.exists():
            directory.mkdir(parents=True)
            os.chmod(directory, m.mode if m.mode is not None else 0o755)
            if (m.uid or m.gid) and os.geteuid() == 0:
                os.chown(directory, m.uid or 0, m.gid or 0)
        return Mount(target=target, kind="cache", source=directory, readonly=m.readonly)
    # bind: from the context (default) or another stage/image; read-only unless rw, and then
    # writes go to a throw-away copy, as in docker.
    source_path = m.source or "/"
    if m.from_:
        view = ctx.source(m.from_, step.instruction).view
        entry = view.lookup(source_path)
        if entry is None:
            raise BuildError(f"--mount from={m.from_}: {source_path} not found")
        copy_dest = tmp / f"mount-{len(os.listdir(tmp))}"
        copy_view_entry(view, entry.backing, entry.st, entry.lower_dirs, str(copy_dest),
                        Ownership(uid=None, gid=None))
        return Mount(target=target, source=copy_dest, readonly=m.readonly)
    context = ctx.services.context
    rel = context.resolve(source_path)[0]
    host = context.host_path(rel)
    if not m.readonly:
        copy_dest = tmp / f"mount-{len(os.listdir(tmp))}"
        if host.is_dir():
            shutil.copytree(host, copy_dest, symlinks=True)
        else:
            shutil.copy2(host, copy_dest)
        host = copy_dest
    return Mount(target=target, source=host, readonly=m.readonly)


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
