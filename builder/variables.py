"""Docker's ARG and ENV scoping, as a pure object the builder threads through a build.

The rules (Dockerfile reference, "ARG" and "Scope"):

* An ARG before the first FROM is a *global* (meta) ARG: it is visible in FROM lines only. A stage
  sees it only after re-declaring it (``ARG NAME`` without a value), and then takes its value.
* Inside a stage, ``ARG NAME[=default]`` declares a variable from that line on; its value is the
  ``--build-arg`` if one was given, else the default, else the global ARG's value, else it is unset.
  Each stage starts with no ARGs.
* ENV always wins over an ARG of the same name; the base image's Env is in scope from the start.
* Predefined ARGs: the proxy variables may be given with ``--build-arg`` without being declared
  (they reach RUN's environment but never the image); the platform ARGs (TARGETPLATFORM, BUILDARCH,
  ...) are set automatically in the global scope, and in a stage after ``ARG TARGETARCH``.
* A ``--build-arg`` that no ARG consumed earns a warning at the end of the build.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

from builder.dockerfile import Arg, ImageConfig
from builder.shellwords import Lexer

PROXY_ARGS = frozenset({"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY",
                        "ftp_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"})


def _go_arch() -> tuple[str, str]:
    machine = platform.machine().lower()
    return {
        "x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
        "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", ""), "i386": ("386", ""),
        "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
    }.get(machine, (machine, ""))


def platform_args() -> dict[str, str]:
    arch, variant = _go_arch()
    plat = f"linux/{arch}" + (f"/{variant}" if variant else "")
    values = {}
    for prefix in ("TARGET", "BUILD"):
        values.update({f"{prefix}PLATFORM": plat, f"{prefix}OS": "linux", f"{prefix}ARCH": arch,
                       f"{prefix}VARIANT": variant})
    return values


_ARCH_ALIASES = {"x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "aarch64": ("arm64", ""),
                 "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "i386": ("386", ""), "i686": ("386", "")}


def foreign_platform(requested: str) -> str | None:
    """None when ``requested`` (``os/arch[/variant]``, as ``FROM --platform`` or ``build --platform``
    take it) is the platform lamina builds for, i.e. this machine's; else why it cannot be built
    (lamina runs RUN natively, with no emulation)."""
    host = platform_args()["BUILDPLATFORM"]
    parts = requested.strip().lower().split("/")
    if not all(parts) or len(parts) > 3:
        return f"invalid platform {requested!r}: expected os/arch[/variant], e.g. {host}"
    if len(parts) == 1:
        parts = ["linux", parts[0]] if parts[0] != "linux" else ["linux", _go_arch()[0]]
    os_name, arch, variant = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    arch, implied = _ARCH_ALIASES.get(arch, (arch, ""))
    variant = variant or implied
    host_arch, host_variant = _go_arch()
    if arch in ("amd64", "arm64") and variant in ("v1", "v8"):
        variant = ""  # the baseline variants name the plain architecture
    if os_name == "linux" and arch == host_arch and variant in ("", host_variant):
        return None
    return (f"platform {requested} is not this machine's ({host}): lamina runs builds natively, "
            "without emulation")


class BuildArgs:
    """The ``--build-arg`` values of one build and the global (pre-FROM) ARGs."""

    def __init__(self, given: Mapping[str, str], lexer: Lexer) -> None:
        self.given = dict(given)
        self.lexer = lexer
        self.used: set[str] = set()
        self.platform = platform_args()
        # Global ARG values, in declaration order (only those declared or predefined).
        self.globals: dict[str, str | None] = {k: v for k, v in self.platform.items()}

    def declare_global(self, arg: Arg) -> tuple[tuple[str, str | None], ...]:
        """Process one ARG line before the first FROM; each name with the value it took."""
        resolved = []
        for name, raw_default in arg.defaults:
            default = arg.expand_default(FixedScope(self.lexer, self.global_variables()), raw_default)
            value = self.given.get(name, default)
            if name in self.given:
                self.used.add(name)
            self.globals[name] = value
            resolved.append((name, value))
        return tuple(resolved)

    def global_variables(self) -> dict[str, str]:
        return {k: v for k, v in self.globals.items() if v is not None}

    def unused(self) -> list[str]:
        return sorted(k for k in self.given if k not in self.used and k not in PROXY_ARGS)


class FixedScope:
    """A scope of fixed values (the global scope of FROM lines and pre-FROM ARGs)."""

    def __init__(self, lexer: Lexer, values: Mapping[str, str]) -> None:
        self.lexer = lexer
        self._values = values

    def variables(self) -> Mapping[str, str]:
        return self._values


class StageScope:
    """Variables of one stage: the ARGs it declared and the ENV of the image being built."""

    def __init__(self, build_args: BuildArgs, image: ImageConfig) -> None:
        self.build_args = build_args
        self.lexer = build_args.lexer
        self.image = image
        self.args: dict[str, str | None] = {}

    def declare(self, arg: Arg) -> tuple[tuple[str, str | None], ...]:
        """Process an ARG inside the stage; each name with the value it took."""
        resolved: list[tuple[str, str | None]] = []
        for name, raw_default in arg.defaults:
            default = arg.expand_default(self, raw_default)
            if name in self.build_args.given:
                value: str | None = self.build_args.given[name]
                self.build_args.used.add(name)
            elif default is not None:
                value = default
            elif name in self.build_args.globals:
                value = self.build_args.globals[name]
            else:
                value = None
            self.args[name] = value
            resolved.append((name, value))
        return tuple(resolved)

    def variables(self) -> dict[str, str]:
        values = {k: v for k, v in self.args.items() if v is not None}
        values.update(self.image.env())
        return values

    def run_environment(self) -> dict[str, str]:
        """The environment of a RUN: the image's Env, plus the ARGs ENV does not override, plus
        undeclared proxy build-args."""
        env = {k: v for k, v in self.build_args.given.items() if k in PROXY_ARGS}
        env.update({k: v for k, v in self.args.items() if v is not None})
        env.update(self.image.env())
        return env
