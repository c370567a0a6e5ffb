"""Every ``lamina`` verb, one module per area, as docker/cli's ``cli/command/<group>/``.

A verb module parses flags, calls the libraries (:mod:`lamina.store`, :mod:`lamina.inspector`,
:mod:`builder`, :mod:`runner`) and prints; the libraries know nothing of argparse. Each module has
``register(subparsers)``, and every verb's parser sets ``handler(args) -> int``.

``VERB_MODULES`` says which module registers which verb, so that only the module owning the verb on
the command line is imported: ``lamina run --rm IMAGE true`` must not pay for the registry client or
the builder (imports were most of its start-up time). tests/test_cli.py checks this table against
what each module really registers.

Command groups (``lamina image ls``, ``container prune``, ``system df``) are docker's second name
for a verb, kept here as data: ``COMMAND_GROUPS`` maps a group and a sub-verb to the name a module
registers. A verb that exists only inside its group is registered under the name ``"GROUP SUB"``
(``"image prune"``): such a name is never a top-level verb, and it appears in its group by itself,
so a module that registers ``"volume create"`` and lists it in ``VERB_MODULES`` needs nothing else.
"""

from __future__ import annotations

VERB_MODULES: dict[str, str] = {
    **dict.fromkeys(["history", "images", "import", "inspect", "load", "rmi", "save", "tag", "image prune"],
                    "lamina.commands.images"),
    **dict.fromkeys(["login", "logout", "pull", "push"], "lamina.commands.registry"),
    "build": "lamina.commands.build",
    **dict.fromkeys(["create", "diff", "exec", "kill", "logs", "port", "ps", "restart", "rm", "run",
                     "start", "stop", "wait", "container prune"], "lamina.commands.containers"),
    **dict.fromkeys(["attach", "commit", "cp", "export", "pause", "rename", "top", "unpause"],
                    "lamina.commands.container_verbs"),
    **dict.fromkeys(["info", "version", "system df", "system prune", "system check", "builder prune"],
                    "lamina.commands.system"),
    **dict.fromkeys(["layers", "mount", "umount", "which"], "lamina.commands.inspector"),
    "volume": "lamina.commands.volumes",
}
ALL_COMMAND_MODULES = tuple(dict.fromkeys(VERB_MODULES.values()))

# docker's management commands: GROUP -> {SUB: registered verb}. Sub-verbs whose verb no module
# registers (yet) are left out when the parser is built, so a verb module added later appears
# here by adding it to VERB_MODULES.
COMMAND_GROUPS: dict[str, dict[str, str]] = {
    "image": {"build": "build", "history": "history", "import": "import", "inspect": "inspect",
              "load": "load", "ls": "images", "list": "images", "prune": "image prune", "pull": "pull",
              "push": "push", "rm": "rmi", "remove": "rmi", "save": "save", "tag": "tag"},
    "container": {"attach": "attach", "commit": "commit", "cp": "cp", "create": "create", "diff": "diff",
                  "exec": "exec", "export": "export", "inspect": "inspect", "kill": "kill", "logs": "logs",
                  "ls": "ps", "list": "ps", "ps": "ps", "pause": "pause", "port": "port",
                  "prune": "container prune", "rename": "rename", "restart": "restart", "rm": "rm",
                  "remove": "rm", "run": "run", "start": "start", "stats": "stats", "stop": "stop",
                  "top": "top", "unpause": "unpause", "update": "update", "wait": "wait"},
    "system": {"info": "info", "df": "system df", "prune": "system prune", "check": "system check"},
    "builder": {"build": "build", "prune": "builder prune"},
    "volume": {},
}

GROUP_HELP: dict[str, str] = {"image": "manage images", "container": "manage containers",
                              "system": "manage lamina and its store", "builder": "manage builds",
                              "volume": "manage volumes"}

# What a sub-verb implies that its top-level verb leaves open (``image inspect`` is ``inspect
# --type image``).
GROUP_DEFAULTS: dict[tuple[str, str], dict[str, object]] = {
    ("image", "inspect"): {"type": "image"},
    ("container", "inspect"): {"type": "container"},
}

# docker's client exits 125 for the errors of run and create (the daemon's "cannot run this"),
# and 1 for every other command's errors (a missing object, a refused request); usage errors
# found by the flag parser are 125 everywhere. lamina's own verbs, which docker lacks, keep 125
# for errors: `layers --fail-on-waste` answers 1 for "too much waste".
VERBS_FAILING_WITH_125 = frozenset({"run", "create", "layers", "mount", "umount", "which"})


def is_top_level(verb: str) -> bool:
    """A verb typed alone (``images``), rather than one that exists only in its group."""
    return " " not in verb


def group_verbs(group: str) -> dict[str, str]:
    """The registered sub-verbs of ``group``: SUB -> verb, in the table's order (a verb's first
    sub-verb is its name in ``--help``, the others its aliases)."""
    listed = {sub: verb for sub, verb in COMMAND_GROUPS.get(group, {}).items() if verb in VERB_MODULES}
    prefix = group + " "
    for verb in VERB_MODULES:
        if verb.startswith(prefix):
            listed.setdefault(verb.removeprefix(prefix), verb)
    return listed


def groups() -> list[str]:
    """The groups that have at least one registered verb and are not a verb themselves."""
    return sorted(g for g in {*COMMAND_GROUPS, *(v.split(" ")[0] for v in VERB_MODULES if not is_top_level(v))}
                  if g not in VERB_MODULES and group_verbs(g))
