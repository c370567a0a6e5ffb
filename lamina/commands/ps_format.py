"""``ps --format``: a container as docker's ContainerContext shows it to a template
(github docker/cli cli/command/formatter/container.go)."""

from __future__ import annotations

from typing import Any

from lamina.commands.formatting import context, go_time
from lamina.gotemplate import NIL_POINTER, GoMethod, GoStruct
from lamina.gotemplate.lex import go_quote
from lamina.store.progress import human_size
from lamina.timeparse import parse_time
from runner.state import Container

PS_HEADER = {"ID": "CONTAINER ID", "Names": "NAMES", "Image": "IMAGE", "Command": "COMMAND",
             "CreatedAt": "CREATED AT", "RunningFor": "CREATED", "Ports": "PORTS", "State": "STATE",
             "Status": "STATUS", "Size": "SIZE", "Labels": "LABELS", "Mounts": "MOUNTS",
             "LocalVolumes": "LOCAL VOLUMES", "Networks": "NETWORKS", "Platform": "PLATFORM"}


def empty_ps_context() -> GoStruct:
    """docker's NewContainerContext(): the row ``ps`` checks a format on before listing."""
    fields: dict[str, Any] = dict.fromkeys(PS_HEADER, "")
    fields.update({"Image": "<no image>", "Command": '""', "CreatedAt": go_time(None), "Size": human_size(0),
                   "LocalVolumes": "0", "Platform": NIL_POINTER, "Label": GoMethod(lambda name: "", 1)})
    return context("*formatter.ContainerContext", fields)


def _ellipsis(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def ps_context(container: Container, row: dict[str, str]) -> GoStruct:
    """The fields of one ``ps`` row (``row`` as the table shows it) and docker's others."""
    labels: dict[str, str] = dict(getattr(container, "labels", None) or {})
    mounts = [str(m.get("name") or m.get("source") or m.get("Source") or "") for m in container.mounts]
    truncate = len(row["ID"]) < len(container.id)
    fields: dict[str, Any] = {
        "ID": row["ID"], "Names": row["Names"], "Image": row["Image"],
        "Command": go_quote(row["Command"][1:-1]),  # docker's strconv.Quote of the (shortened) command
        "CreatedAt": go_time(parse_time(container.created)), "RunningFor": row["RunningFor"],
        "Ports": row["Ports"], "State": row["State"], "Status": row["Status"], "Size": human_size(0),
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "Mounts": ",".join(_ellipsis(m, 15) if truncate else m for m in mounts),
        "LocalVolumes": str(len(getattr(container, "anonymous_volumes", []) or [])),
        "Networks": container.network,
        "Platform": NIL_POINTER,  # docker 28.2: a *Platform, nil unless the daemon reports one
    }
    fields["Label"] = GoMethod(lambda name: labels.get(name, ""), 1)
    return context("*formatter.ContainerContext", fields)
