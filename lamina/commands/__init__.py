"""Every ``lamina`` verb, one module per area, as docker/cli's ``cli/command/<group>/``.

A verb module parses flags, calls the libraries (:mod:`lamina.store`, :mod:`lamina.inspector`,
:mod:`builder`, :mod:`runner`) and prints; the libraries know nothing of argparse. Each module has
``register(subparsers)``, and every verb's parser sets ``handler(args) -> int``.

``VERB_MODULES`` says which module registers which verb, so that only the module owning the verb on
the command line is imported: ``lamina run --rm IMAGE true`` must not pay for the registry client or
the builder (imports were most of its start-up time). tests/test_cli.py checks this table against
what each module really registers.
"""

from __future__ import annotations

VERB_MODULES: dict[str, str] = {
    **dict.fromkeys(["history", "images", "import", "inspect", "load", "rmi", "save", "system", "tag"],
                    "lamina.commands.images"),
    **dict.fromkeys(["login", "logout", "pull", "push"], "lamina.commands.registry"),
    "build": "lamina.commands.build",
    **dict.fromkeys(["create", "diff", "exec", "kill", "logs", "port", "ps", "restart", "rm", "run",
                     "start", "stop", "wait"], "lamina.commands.containers"),
    **dict.fromkeys(["attach", "commit", "cp", "export", "pause", "rename", "top", "unpause"],
                    "lamina.commands.container_verbs"),
    **dict.fromkeys(["layers", "mount", "umount", "which"], "lamina.commands.inspector"),
    "volume": "lamina.commands.volumes",
}
ALL_COMMAND_MODULES = tuple(dict.fromkeys(VERB_MODULES.values()))
