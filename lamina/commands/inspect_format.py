"""``inspect --format``: docker's TemplateInspector (github docker/cli cli/command/inspect).

docker runs the template on the typed struct it decoded (types.ImageInspect, container.InspectResponse)
and, when that fails, on the raw JSON with ``missingkey=error``. The typed run is what most templates
see: every field of docker's struct is there (a field the object lacks prints its zero value), a
missing key of a map (``.Config.Labels.x``) prints ``<no value>``, and a field docker does not have
fails, so the raw run reports ``map has no entry for key``. ``{{.ID}}`` (the Go field) works in the
typed run and ``{{.Id}}`` (its JSON name) in the raw one, so each works alone, as with docker, and
a template with both fails. lamina's objects are JSON; the typed view
below rebuilds docker's structs from them with the fields docker declares.
"""

from __future__ import annotations

import json
from typing import Any

from lamina.commands.formatting import INSPECT_PARSE_EXIT, parse_format
from lamina.gotemplate import GoStruct
from lamina.gotemplate import TemplateError as GoTemplateErrors

# docker's structs: each field and its Go zero value (pointer fields, nil, are left out: lamina has
# none of them). A dict value names a nested struct by its schema key.
_SCHEMAS: dict[str, dict[str, Any]] = {
    "ImageInspect": {
        "Id": "", "RepoTags": [], "RepoDigests": [], "Parent": "", "Comment": "", "Created": "",
        "DockerVersion": "", "Author": "", "Config": "Config", "Architecture": "", "Variant": "", "Os": "",
        "OsVersion": "", "Size": 0, "GraphDriver": "GraphDriver", "RootFS": "RootFS", "Metadata": "Metadata"},
    "ContainerInspect": {
        "Id": "", "Created": "", "Path": "", "Args": [], "State": "State", "Image": "", "ResolvConfPath": "",
        "HostnamePath": "", "HostsPath": "", "LogPath": "", "Name": "", "RestartCount": 0, "Driver": "",
        "Platform": "", "MountLabel": "", "ProcessLabel": "", "AppArmorProfile": "", "ExecIDs": [],
        "HostConfig": "HostConfig", "GraphDriver": "GraphDriver", "Mounts": [], "Config": "Config",
        "NetworkSettings": "NetworkSettings"},
    "Config": {
        "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False, "AttachStdout": False,
        "AttachStderr": False, "ExposedPorts": {}, "Tty": False, "OpenStdin": False, "StdinOnce": False,
        "Env": [], "Cmd": [], "ArgsEscaped": False, "Image": "", "Volumes": {}, "WorkingDir": "",
        "Entrypoint": [], "NetworkDisabled": False, "MacAddress": "", "OnBuild": [], "Labels": {},
        "StopSignal": "", "Shell": []},
    "State": {
        "Status": "", "Running": False, "Paused": False, "Restarting": False, "OOMKilled": False,
        "Dead": False, "Pid": 0, "ExitCode": 0, "Error": "", "StartedAt": "", "FinishedAt": ""},
    "HostConfig": {
        "Binds": [], "ContainerIDFile": "", "NetworkMode": "", "PortBindings": {}, "AutoRemove": False,
        "VolumeDriver": "", "VolumesFrom": [], "CapAdd": [], "CapDrop": [], "Dns": [], "DnsOptions": [],
        "DnsSearch": [], "ExtraHosts": [], "GroupAdd": [], "IpcMode": "", "Cgroup": "", "Links": [],
        "OomScoreAdj": 0, "PidMode": "", "Privileged": False, "PublishAllPorts": False,
        "ReadonlyRootfs": False, "SecurityOpt": [], "Tmpfs": {}, "UTSMode": "", "UsernsMode": "",
        "ShmSize": 0, "Sysctls": {}, "Runtime": "", "Isolation": "", "Init": False},
    "NetworkSettings": {"Bridge": "", "SandboxID": "", "Ports": {}, "SandboxKey": "", "Networks": {}},
    "RootFS": {"Type": "", "Layers": []},
    "GraphDriver": {"Name": "", "Data": {}},
    "Metadata": {"LastTagTime": ""},
}


def _struct(value: dict[str, Any], schema_name: str) -> GoStruct:
    schema = _SCHEMAS[schema_name]
    fields: dict[str, Any] = {}
    for name, zero in schema.items():
        given = value.get(name)
        if isinstance(zero, str) and zero in _SCHEMAS:  # a nested struct
            fields[name] = _struct(given if isinstance(given, dict) else {}, zero)
        else:
            fields[name] = zero if given is None else given
    for name, given in value.items():  # lamina's fields docker lacks stay reachable
        fields.setdefault(name, given)
    if "Id" in schema:  # the Go field is ID, its JSON name Id: {{.ID}} typed, {{.Id}} by the raw run
        fields["ID"] = fields.pop("Id")
    # {{json .Config}} encodes the object as lamina's inspect prints it, not the zeros filled in
    return GoStruct(f"*types.{schema_name}", fields, json_fields=lambda: value, marshals_itself=False)


def typed_view(obj: dict[str, Any]) -> GoStruct:
    """``obj`` (an image's or a container's inspect JSON) as docker's typed struct."""
    return _struct(obj, "ContainerInspect" if "State" in obj else "ImageInspect")


def render_inspect(fmt: str, objects: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(the text docker prints for ``inspect --format fmt``, the errors it reports after it)."""
    if fmt == "json":
        return json.dumps(objects, separators=(",", ":")) + "\n", []
    template = parse_format(fmt, INSPECT_PARSE_EXIT)
    out: list[str] = []
    errors: list[str] = []
    for obj in objects:
        try:
            out.append(template.execute(typed_view(obj)) + "\n")
            continue
        except GoTemplateErrors:
            pass
        try:
            out.append(template.execute(obj, missing_key_error=True) + "\n")
        except GoTemplateErrors as e:
            errors.append(f"template parsing error: {e}")
    return "".join(out) or "\n", errors
