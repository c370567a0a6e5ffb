"""The ``run``/``create`` flags beyond the basics: mounts and volumes, /etc files, labels, privileges,
limits, stop and restart behaviour. :func:`add_flags` declares them; :func:`container_fields` reads
them into the container record's fields (through the pure parsers of :mod:`runner.runflags` and
:mod:`runner.mountflags`); :func:`make_volumes` makes the volumes the mounts need, once every flag
has been read."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from lamina.errors import UsageError
from lamina.layout import Layout
from runner import mountflags, runflags
from runner.mountflags import MountPlan


def add_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--mount", action="append", default=[], metavar="type=bind|volume|tmpfs,source=,target=[,readonly]",
      help="attach a filesystem mount (docker's --mount syntax)")
    a("--volumes-from", action="append", default=[], metavar="CONTAINER[:ro|rw]",
      help="mount the volumes and binds of another container")
    a("--add-host", action="append", default=[], metavar="HOST:IP", help="add a line to /etc/hosts")
    a("--dns", action="append", default=[], metavar="IP", help="a nameserver for /etc/resolv.conf")
    a("--dns-search", action="append", default=[], metavar="DOMAIN", help="a search domain for /etc/resolv.conf")
    a("--dns-option", "--dns-opt", action="append", default=[], metavar="OPT",
      help="an options line entry for /etc/resolv.conf")
    a("-l", "--label", action="append", default=[], metavar="KEY=VALUE", help="set a label on the container")
    a("--label-file", action="append", default=[], metavar="FILE", help="read labels from FILE")
    a("--platform", help="the platform to run (only the host's)")
    a("--cap-add", action="append", default=[], metavar="CAP", help="add a capability (or ALL)")
    a("--cap-drop", action="append", default=[], metavar="CAP", help="drop a capability (or ALL)")
    a("--privileged", action="store_true", help="every capability, no seccomp filter, /proc unmasked")
    a("--ulimit", action="append", default=[], metavar="NAME=SOFT[:HARD]", help="a resource limit (nofile=...)")
    a("--shm-size", metavar="BYTES", help="size of /dev/shm (default 64m)")
    a("--stop-signal", help="signal that stops the container (default: the image's, else SIGTERM)")
    a("--stop-timeout", type=int, metavar="SECONDS", help="seconds stop waits before SIGKILL (default 10)")
    a("--restart", default="no", metavar="POLICY", help="no, on-failure[:N], always or unless-stopped")
    a("-m", "--memory", metavar="BYTES", help="memory limit (needs a delegated cgroup v2)")
    a("--cpus", metavar="N", help="number of CPUs (needs a delegated cgroup v2)")
    a("--pids-limit", type=int, metavar="N", help="process limit (needs a delegated cgroup v2)")
    a("--cidfile", metavar="FILE", help="write the container's id to FILE")
    a("--log-driver", metavar="DRIVER", help="json-file (the only one)")
    a("--log-opt", action="append", default=[], metavar="KEY=VALUE", help="max-size=, max-file= of the log")
    a("--health-cmd", metavar="COMMAND", help="command that checks the container's health (run by sh -c)")
    a("--health-interval", metavar="DURATION", help="time between checks (default 30s)")
    a("--health-timeout", metavar="DURATION", help="time a check may take (default 30s)")
    a("--health-retries", type=int, metavar="N", help="failures in a row that make it unhealthy (default 3)")
    a("--health-start-period", metavar="DURATION", help="time during which failures do not count")
    a("--no-healthcheck", action="store_true", help="disable the image's HEALTHCHECK")
    a("--pid", default="", metavar="MODE", help="host: share the host's PID namespace")
    a("--ipc", default="", metavar="MODE",
      help="IPC namespace: private (default), shareable, none (no /dev/shm), host or container:NAME")
    a("-a", "--attach", action="append", default=[], metavar="STREAM",
      help="attach to stdin, stdout or stderr (default: stdout and stderr)")


def _mount_plans(args: argparse.Namespace, layout: Layout, image_config: dict[str, Any]) -> list[MountPlan]:
    from runner import imageconfig
    from runner.state import ContainerStore

    plans = [mountflags.parse_volume(text) for text in args.volume]
    plans += [mountflags.parse_mount(text) for text in args.mount]
    plans += [mountflags.parse_tmpfs(text) for text in args.tmpfs]
    for text in args.volumes_from:
        name, _, _ = text.partition(":")
        source = ContainerStore(layout).get(name)
        plans += mountflags.volumes_from(text, source.mounts)[1]
    mountflags.check_duplicates(plans)
    return mountflags.add_image_volumes(plans, imageconfig.image_volumes(image_config))


def make_volumes(layout: Layout, plans: list[MountPlan]) -> tuple[list[dict[str, Any]], list[str]]:
    """Make the volumes ``plans`` need (named ones when missing, anonymous ones new); return the
    mount records and the anonymous volumes' names. A failure removes the anonymous volumes made."""
    from runner.volumes import VolumeStore

    volumes = VolumeStore(layout)
    anonymous: list[str] = []
    try:
        for plan in plans:
            if plan.kind != "volume":
                continue
            if plan.volume is None:
                made = volumes.create()
                anonymous.append(made.name)
            else:
                made = volumes.create(plan.volume, labels=plan.labels)
            plan.volume, plan.source, plan.volume_options = made.name, str(made.data), made.options
    except BaseException:
        discard_volumes(layout, anonymous)
        raise
    return [plan.record() for plan in plans], anonymous


def discard_volumes(layout: Layout, names: list[str]) -> None:
    from runner.volumes import VolumeStore

    for name in names:
        VolumeStore(layout).remove_quietly(name)


def container_fields(args: argparse.Namespace, layout: Layout,
                     image_config: dict[str, Any]) -> tuple[dict[str, Any], list[MountPlan]]:
    """The record's fields from the flags (nothing made on disk yet) and the mounts to make."""
    if args.platform:
        runflags.parse_platform(args.platform)
    security = runflags.parse_security_opts(args.security_opt)
    if args.privileged:
        security["seccomp"] = False
        security["unmask_proc"] = True
    restart = runflags.parse_restart(args.restart)
    if restart["Name"] != "no" and args.rm:
        raise UsageError("--restart: conflicting options: cannot specify both --restart and --rm")
    labels = {str(k): str(v) for k, v in (image_config.get("Labels") or {}).items()}
    labels.update(runflags.read_labels(args.label, args.label_file))
    caps = None
    if args.cap_add or args.cap_drop or args.privileged:
        caps = runflags.capabilities(args.cap_add, args.cap_drop, args.privileged)
    fields: dict[str, Any] = {
        "labels": labels,
        "extra_hosts": [list(runflags.parse_add_host(text)) for text in args.add_host],
        "dns": [runflags.parse_dns(text) for text in args.dns],
        "dns_search": runflags.check_resolver_words("--dns-search", args.dns_search),
        "dns_options": runflags.check_resolver_words("--dns-option", args.dns_option),
        "capabilities": caps, "privileged": args.privileged, "seccomp": security["seccomp"],
        "no_new_privileges": security["no_new_privileges"], "unmask_proc": security["unmask_proc"],
        "ulimits": [runflags.parse_ulimit(text) for text in args.ulimit],
        "shm_size": _shm_size(args.shm_size), "stop_timeout": args.stop_timeout, "restart_policy": restart,
        "log_options": runflags.parse_log_opts(args.log_opt, args.log_driver),
        "resources": _resources(args), "platform": args.platform or "",
        "healthcheck": _healthcheck(args, image_config),
        "pid_mode": _pid_mode(args.pid), "attach": _attach(args), "ipc_mode": _ipc_mode(args.ipc, layout),
    }
    if args.stop_signal:
        fields["stop_signal"] = runflags.signal_flag("--stop-signal", args.stop_signal)
    if args.stop_timeout is not None and args.stop_timeout < -1:
        raise UsageError(f"--stop-timeout {args.stop_timeout}: must be -1 (no limit) or more")
    return fields, _mount_plans(args, layout, image_config)


def _pid_mode(text: str) -> str:
    if text not in ("", "host"):
        raise UsageError(f"--pid {text}: invalid PID mode (only host is supported)")
    return text


def _ipc_mode(text: str, layout: Layout) -> str:
    """docker's ``--ipc``: a mode, or ``container:NAME`` recorded as ``container:<id>``."""
    if text in ("", "none", "private", "shareable", "host"):
        return text
    if not text.startswith("container:") or text == "container:":
        raise UsageError(f"--ipc {text}: invalid IPC mode")
    from runner.state import ContainerStore

    return "container:" + ContainerStore(layout).get(text.removeprefix("container:")).id


def _attach(args: argparse.Namespace) -> list[str]:
    streams = [s.lower() for s in args.attach]
    for stream in streams:
        if stream not in ("stdin", "stdout", "stderr"):
            raise UsageError(f"-a {stream}: invalid argument, must be one of stdin, stdout, stderr")
    if streams and getattr(args, "detach", False):
        raise UsageError("-a: conflicting options: cannot specify both --attach and --detach")
    return sorted(set(streams))


def resolve_network(args: argparse.Namespace, layout: Layout, network: str) -> str:
    """``--network container:NAME`` as docker records it (``container:<id>``), and the flags docker
    refuses with it: the network, its names and its ports belong to that container."""
    if not network.startswith("container:"):
        return network
    from runner.state import ContainerStore

    for flag, given in (("-p", args.publish), ("--hostname", args.hostname), ("--dns", args.dns),
                        ("--add-host", args.add_host)):
        if given:
            raise UsageError(f"{flag}: conflicting options: {flag} and the network mode container")
    other = ContainerStore(layout).get(network.removeprefix("container:"))
    return f"container:{other.id}"


def _healthcheck(args: argparse.Namespace, image_config: dict[str, Any]) -> dict[str, Any] | None:
    from runner.health import merge_config

    def seconds(flag: str, text: str | None) -> float | None:
        return runflags.parse_duration_seconds(flag, text) if text is not None else None

    image = image_config.get("Healthcheck")
    return merge_config(image if isinstance(image, dict) else None, args.health_cmd,
                        seconds("--health-interval", args.health_interval),
                        seconds("--health-timeout", args.health_timeout), args.health_retries,
                        seconds("--health-start-period", args.health_start_period), args.no_healthcheck)


def _shm_size(text: str | None) -> int:
    if text is None:
        return 0
    size = mountflags.parse_bytes("--shm-size", text)
    if size <= 0:
        raise UsageError(f"--shm-size {text}: invalid size: must be greater than 0")
    return size


def _resources(args: argparse.Namespace) -> dict[str, int]:
    resources: dict[str, int] = {}
    # 0 is docker's "no limit" for both (its daemon checks the minimum and range of other values).
    memory = mountflags.parse_bytes("--memory", args.memory) if args.memory else 0
    if 0 < memory < 6 * 1024 * 1024:
        raise UsageError(f"--memory {args.memory}: minimum memory limit allowed is 6MB")
    if memory:
        resources["Memory"] = memory
    nano_cpus = runflags.parse_cpus(args.cpus) if args.cpus else 0
    if nano_cpus:
        resources["NanoCpus"] = nano_cpus
    if args.pids_limit is not None:
        resources["PidsLimit"] = args.pids_limit
    if resources:
        from runner import cgroups

        problem = cgroups.plan_limits(resources, cgroups.find_delegation())
        if problem is not None:
            warn(problem)  # as rootless podman: the container runs without them
    return resources


def write_cidfile(path: str | None, container_id: str) -> None:
    """``--cidfile``: refused when the file exists, as docker does (another container may own it)."""
    if not path:
        return
    import os

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise UsageError(f"--cidfile {path}: container ID file found, make sure the other container isn't "
                         "running or delete " + path) from None
    except OSError as e:
        raise UsageError(f"--cidfile {path}: failed to create the container ID file: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        f.write(container_id)


def check_cidfile(path: str | None) -> None:
    import os

    if path and os.path.lexists(path):
        raise UsageError(f"--cidfile {path}: container ID file found, make sure the other container isn't "
                         "running or delete " + path)


def warn(message: str) -> None:
    with contextlib.suppress(OSError):
        print(f"WARNING: {message}", file=sys.stderr)
