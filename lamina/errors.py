"""The small error hierarchy every lamina package raises, translated once by the CLI.

Docker's exit-code conventions: 125 for an error of lamina itself (bad flag, missing image, corrupt
input), 126 when the container's command cannot be invoked, 127 when it is not found; otherwise the
container's own exit code. docker's client narrows the first: 125 is the code of ``run`` and
``create`` (and of any bad flag); every other command's errors exit 1 (``rmi nosuch``, ``stop
nosuch``, ``inspect nosuch``), which the CLI's error boundary applies to :data:`EXIT_LAMINA`
(:func:`lamina.cli.docker_exit_code`).
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_LAMINA = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127


class LaminaError(Exception):
    """An error the user caused or can fix: shown as one line ``lamina: error: MESSAGE``."""

    exit_code: int = EXIT_LAMINA


class UsageError(LaminaError):
    """A bad command line: the message names the flag or argument."""


class CommandLineError(UsageError):
    """An unknown command or a missing argument: docker's client exits 1 for these (its
    ``RequiresMinArgs``), and 125 only for a bad flag."""

    exit_code = EXIT_FAILED


class NotFoundError(LaminaError):
    """Something named on the command line does not exist."""


class ImageNotFound(NotFoundError):
    def __init__(self, reference: str) -> None:
        super().__init__(f"image not known: {reference}")
        self.reference = reference


class ContainerNotFound(NotFoundError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no such container: {name}")
        self.name = name


class StoreError(LaminaError):
    """The image store cannot do what was asked (locked, corrupt, in use)."""


class LayerError(LaminaError):
    """A layer tarball or directory is malformed or hostile; the message names the entry."""


class FormatError(LaminaError):
    """An archive, manifest or config is not in a format we read; the message names the file."""


class RegistryError(LaminaError):
    """A registry refused a request or answered something we cannot trust (e.g. a wrong digest)."""


class DockerfileError(LaminaError):
    """A Dockerfile we cannot parse or execute, located as ``file:line: message``."""

    def __init__(self, message: str, file: str = "Dockerfile", line: int | None = None,
                 source_line: str | None = None) -> None:
        location = f"{file}:{line}" if line is not None else file
        text = f"{location}: {message}"
        if source_line is not None:
            text += f": {source_line.strip()!r}"
        super().__init__(text)
        self.file = file
        self.line = line


class BuildError(LaminaError):
    """A build step failed (for example a RUN exited non-zero); the store is left as it was."""


class ContainerError(LaminaError):
    """The container could not be created or started."""


class CommandNotInvokable(LaminaError):
    exit_code = EXIT_CANNOT_INVOKE


class CommandNotFound(LaminaError):
    exit_code = EXIT_NOT_FOUND


class MountError(LaminaError):
    """A union mount could not be made or did not become ready in time."""
