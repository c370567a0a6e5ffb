"""``run``/``create`` flags beyond the basics, read as docker reads them (pure functions, unit-tested).

Each parser takes the flag's text and returns what the container record keeps, or raises
:class:`UsageError` naming the flag, with docker's wording where scripts may match on it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Iterable
from typing import Any

from lamina.bounded import bounded_lines
from lamina.errors import UsageError
from runner import linux
from runner.imageconfig import parse_signal

# ``--ulimit`` names (docker's units.ulimitNameMapping) -> RLIMIT_* numbers on Linux.
ULIMITS = {"core": 4, "cpu": 0, "data": 2, "fsize": 1, "locks": 10, "memlock": 8, "msgqueue": 12, "nice": 13,
           "nofile": 7, "nproc": 6, "rss": 5, "rtprio": 14, "rttime": 15, "sigpending": 11, "stack": 3,
           "as": 9}
RESTART_POLICIES = ("no", "always", "on-failure", "unless-stopped")
LOG_OPTS = {"max-size", "max-file", "compress", "labels", "labels-regex", "env", "env-regex", "tag", "mode",
            "max-buffer-size"}
SLIRP_GATEWAY = "10.0.2.2"


def parse_add_host(text: str) -> tuple[str, str]:
    """``--add-host HOST:IP`` (or ``HOST=IP``; ``host-gateway`` for the host as the container sees it)."""
    sep = "=" if "=" in text else ":"
    host, found, address = text.partition(sep)
    if not found or not host or not address or not _printable_word(host):
        quoted = json.dumps(text)  # Go's %q, as docker prints it: a newline stays on the line
        raise UsageError(f"--add-host: bad format for add-host: {quoted}")
    address = address.strip("[]")
    if address == "host-gateway":
        return host, SLIRP_GATEWAY
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f'--add-host {text}: invalid IP address in add-host: "{address}"') from None
    return host, address


def _printable_word(text: str) -> bool:
    """One word for a line of /etc/hosts or /etc/resolv.conf: no space, no control character (a
    newline would add a line of the caller's choosing)."""
    return bool(text) and all(c.isprintable() and not c.isspace() for c in text)


def check_resolver_words(flag: str, values: list[str]) -> list[str]:
    """``--dns-search``/``--dns-option`` values, each one word of resolv.conf."""
    for value in values:
        if not _printable_word(value):
            raise UsageError(f"{flag} {value!r}: must be one word without spaces or control characters")
    return list(values)


def parse_dns(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"--dns {text}: {text} is not an ip address") from None


def read_labels(flags: list[str], files: list[str]) -> dict[str, str]:
    """``--label-file`` lines (as env files: ``#`` comments and blank lines skipped), then ``--label``."""
    entries: list[tuple[str, str]] = []
    for path in files:
        what = f"--label-file {path}"
        try:
            with open(path, "rb") as f:
                for raw in bounded_lines(f, what):
                    line = raw.decode("utf-8", "surrogateescape").strip()
                    if line and not line.startswith("#"):
                        entries.append((what, line))
        except OSError as e:
            raise UsageError(f"{what}: {e.strerror}") from e
    entries += [("--label", text) for text in flags]
    labels: dict[str, str] = {}
    for what, entry in entries:
        key, _, value = entry.partition("=")
        if not key or "\0" in entry:
            raise UsageError(f"{what}: invalid label '{entry}': empty name")
        labels[key] = value
    return labels


def _cap_name(flag: str, text: str) -> str:
    name = text.strip().upper()
    if name == "ALL":
        return name
    name = name if name.startswith("CAP_") else "CAP_" + name
    if name not in linux.CAPABILITIES:
        raise UsageError(f'{flag} {text}: unknown capability: "{name}"')
    return name


def capabilities(adds: list[str], drops: list[str], privileged: bool) -> list[str]:
    """The container's capabilities (docker's TweakCapabilities): the default set without the drops
    (none with ``ALL``), plus the adds (every capability with ``ALL`` or ``--privileged``)."""
    every = list(linux.CAPABILITIES)
    add = [_cap_name("--cap-add", c) for c in adds]
    drop = [_cap_name("--cap-drop", c) for c in drops]
    if privileged or "ALL" in add:
        return every
    caps = [] if "ALL" in drop else [c for c in linux.DOCKER_DEFAULT_CAPS if c not in drop]
    caps += [c for c in add if c not in caps]
    return sorted(caps, key=every.index)


def parse_security_opts(opts: list[str]) -> dict[str, bool]:
    """``--security-opt``: seccomp, no-new-privileges, label, apparmor, systempaths."""
    result = {"seccomp": True, "no_new_privileges": False, "unmask_proc": False}
    for opt in opts:
        key, sep, value = opt.partition("=") if "=" in opt else opt.partition(":")
        if key == "no-new-privileges":
            answer = {"": True, "true": True, "false": False}.get(value.lower()) if sep or not value else None
            if answer is None:
                raise UsageError(f"--security-opt {opt}: invalid no-new-privileges value {value!r}")
            result["no_new_privileges"] = answer
        elif key == "seccomp" and value == "unconfined":
            result["seccomp"] = False
        elif key == "seccomp":
            raise UsageError(f"--security-opt {opt}: only seccomp=unconfined is supported (the default profile "
                             "is built in)")
        elif key in ("label", "apparmor") and sep:
            # No SELinux or AppArmor here: docker accepts these and has nothing to apply either.
            continue
        elif key == "systempaths" and value == "unconfined":
            result["unmask_proc"] = True
        else:
            raise UsageError(f"--security-opt {opt}: invalid --security-opt: {opt!r}")
    return result


def parse_ulimit(text: str) -> dict[str, Any]:
    """``--ulimit NAME=SOFT[:HARD]`` (-1: unlimited)."""
    name, sep, limits = text.partition("=")
    if not sep:
        raise UsageError(f'--ulimit {text}: invalid ulimit argument: {text}')
    if name not in ULIMITS:
        raise UsageError(f"--ulimit {text}: invalid ulimit type: {name}")
    soft_text, _, hard_text = limits.partition(":")
    try:
        soft = int(soft_text)
        hard = int(hard_text) if hard_text else soft
    except ValueError:
        raise UsageError(f"--ulimit {text}: invalid ulimit argument: {text}") from None
    if not all(-1 <= value < 1 << 63 for value in (soft, hard)):
        raise UsageError(f"--ulimit {text}: invalid ulimit argument: {text} (a number, or -1 for unlimited)")
    if soft != -1 and hard != -1 and soft > hard:
        raise UsageError(f"--ulimit {text}: ulimit soft limit must be less than or equal to hard limit: "
                         f"{soft} > {hard}")
    return {"Name": name, "Soft": soft, "Hard": hard}


def rlimits(ulimits: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """The record's ``--ulimit`` entries as (RLIMIT_*, soft, hard)."""
    return [(ULIMITS[u["Name"]], int(u["Soft"]), int(u["Hard"])) for u in ulimits]


def parse_restart(text: str) -> dict[str, Any]:
    name, _, count = text.partition(":")
    if name not in RESTART_POLICIES:
        raise UsageError(f"--restart {text}: invalid restart policy: unknown policy '{name}'; use one of 'no', "
                         "'always', 'on-failure', or 'unless-stopped'")
    retries = 0
    if count:
        if name != "on-failure":
            raise UsageError(f"--restart {text}: invalid restart policy: maximum retry count can only be used "
                             "with 'on-failure'")
        if not count.isdigit():
            raise UsageError(f"--restart {text}: invalid restart policy: maximum retry count must be an integer")
        retries = int(count)
    return {"Name": name, "MaximumRetryCount": retries}


def should_restart(policy: dict[str, Any], exit_code: int, restarts: int, stopped_by_user: bool) -> bool:
    """docker's restart manager: never after ``stop``; ``on-failure`` on a non-zero exit up to its
    count; ``always`` and ``unless-stopped`` every time."""
    name = policy.get("Name", "no")
    if stopped_by_user or name == "no":
        return False
    if name == "on-failure":
        retries = int(policy.get("MaximumRetryCount") or 0)
        return exit_code != 0 and (retries == 0 or restarts < retries)
    return True


def parse_log_opts(opts: list[str], driver: str | None) -> dict[str, str]:
    """``--log-opt`` for the json-file-like log docker keeps by default (``--log-driver json-file``)."""
    if driver not in (None, "json-file", "local"):
        raise UsageError(f"--log-driver {driver}: only json-file logs are kept here")
    result: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise UsageError(f"--log-opt {opt}: invalid log opt format, expected KEY=VALUE")
        if key not in LOG_OPTS:
            raise UsageError(f"--log-opt {opt}: unknown log opt '{key}' for json-file log driver")
        if key == "max-size":
            from runner.mountflags import parse_bytes

            if value != "-1" and parse_bytes("--log-opt max-size", value) <= 0:
                raise UsageError(f"--log-opt {opt}: max-size must be a positive number")
        if key == "max-file" and (not value.isdigit() or int(value) < 1):
            raise UsageError(f"--log-opt {opt}: max-file cannot be less than 1")
        result[key] = value
    if "max-file" in result and int(result["max-file"]) > 1 and "max-size" not in result:
        raise UsageError("--log-opt max-file: max-file cannot be set without max-size")
    return result


def parse_cpus(text: str) -> int:
    """``--cpus 1.5`` -> nano-CPUs."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--cpus {text}: failed to parse {text} as a rational number") from None
    count = os.cpu_count() or 1
    if value == 0:
        return 0  # docker's "no limit"
    if not (math.isfinite(value) and 0.01 <= value <= count):
        raise UsageError(f"--cpus {text}: range of CPUs is from 0.01 to {count}.00, as there are only {count} "
                         "CPUs available")
    return int(value * 1e9)


def parse_platform(text: str) -> str:
    """``--platform``: the host's platform (os, os/arch or os/arch/variant) or a UsageError."""
    from lamina.store.platforms import host_platform

    host = host_platform()
    parts = text.lower().split("/")
    wanted = {1: parts[0] in ("linux", host.architecture),
              2: parts[:2] == ["linux", host.architecture],
              3: parts[:2] == ["linux", host.architecture] and (host.variant is None or parts[2] == host.variant)}
    if not wanted.get(len(parts), False):
        raise UsageError(f"--platform {text}: only the host's platform {host} can run here (no emulation)")
    return str(host)


def signal_flag(flag: str, text: str) -> int:
    try:
        return parse_signal(text)
    except UsageError:
        raise UsageError(f"{flag} {text}: invalid signal: {text}") from None


def parse_duration_seconds(flag: str, text: str) -> float:
    from lamina.timeparse import parse_go_duration

    try:
        value = parse_go_duration(text) / 1e9
    except ValueError:
        raise UsageError(f"{flag} {text}: invalid duration (e.g. 30s, 1m30s)") from None
    if value < 0:
        raise UsageError(f"{flag} {text}: must not be negative")
    return value


def hosts_lines(extra: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{address}\t{host}\n" for host, address in extra)
