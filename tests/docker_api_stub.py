"""A stand-in Docker Engine API on a Unix socket, so that docker's own CLI formats lamina's data.

The real ``docker`` client (its formatter package and text/template) is the outside reference for
``--format``; it needs a daemon only to fetch the objects. This stub answers the few read-only
endpoints the listing verbs call (``/_ping``, ``/images/json``, ``/images/NAME/json``,
``/images/NAME/history``, ``/containers/json``, ``/containers/NAME/json``) with JSON built from lamina's own store, and
nothing else. It runs in a thread of the test process, for one test.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import signal
import socketserver
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from lamina.application import open_store
from lamina.commands.images import history_rows, image_inspect
from lamina.layout import Layout
from lamina.store.reference import Reference
from lamina.timeparse import parse_time
from runner.state import ContainerStore, inspect_container

API_VERSION = "1.41"


def _timestamp(when: dt.datetime | None) -> int:
    return int(when.timestamp()) if when else 0


def engine_objects(root: Path) -> dict[str, Any]:
    """What a Docker daemon would answer for the images and containers of the lamina store at
    ``root``: the endpoints' paths (without the version prefix) and their JSON."""
    store = open_store(Layout(root))
    answers: dict[str, Any] = {}
    summaries = []
    for image in store.images():
        names = [Reference.parse(t) for t in image.tags]
        summaries.append({
            "Id": "sha256:" + image.id, "ParentId": "", "RepoTags": [r.familiar for r in names],
            "RepoDigests": [f"{r.familiar_name}@{image.manifest_digest}" for r in names],
            "Created": _timestamp(image.created), "Size": image.size, "SharedSize": -1, "Containers": -1,
            "Labels": None})
        history = [{"Id": "sha256:" + row["id"] if row["id"] != "<missing>" else "<missing>",
                    "Created": _timestamp(row["created_at"]), "CreatedBy": row["created_by"],
                    "Tags": image.tags if i == 0 else None, "Size": row["size"], "Comment": row["comment"]}
                   for i, row in enumerate(history_rows(image))]
        inspect = image_inspect(store, image)
        for key in [image.id, *image.tags, *(r.familiar for r in names), *(r.familiar_name for r in names)]:
            answers[f"/images/{key}/history"] = history
            answers[f"/images/{key}/json"] = inspect
    answers["/images/json"] = summaries
    containers = []
    for c in ContainerStore(Layout(root)).all():
        inspect_json = inspect_container(Layout(root), c.id)
        # lamina records the stop signal as a number where docker's API has its name: a difference
        # of runner/state.py's inspect, not of --format; docker's client refuses the number
        stop_signal = inspect_json["Config"].get("StopSignal")
        if isinstance(stop_signal, int):
            inspect_json["Config"]["StopSignal"] = signal.Signals(stop_signal).name
        for key in (c.id, c.short_id, c.name):
            answers[f"/containers/{key}/json"] = inspect_json
        containers.append({
            "Id": c.id, "Names": ["/" + c.name], "Image": c.image, "ImageID": "sha256:" + c.image_id,
            "Command": shlex.join(c.argv), "Created": _timestamp(parse_time(c.created)), "Ports": [],
            "Labels": dict(getattr(c, "labels", None) or {}), "State": c.state.status,
            "Status": "Created" if c.state.status == "created" else c.state.status,
            "HostConfig": {"NetworkMode": c.network}, "NetworkSettings": {"Networks": {c.network: {}}},
            "Mounts": []})
    answers["/containers/json"] = containers
    return answers


class _Handler(BaseHTTPRequestHandler):
    answers: dict[str, Any] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "docker-api-stub"

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Api-Version", API_VERSION)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._reply(200, b"OK")

    def do_GET(self) -> None:
        path = urllib.parse.unquote(re.sub(r"^/v[0-9.]+", "", self.path.split("?")[0]))
        if path == "/_ping":
            self._reply(200, b"OK")
        elif path in self.answers:
            self._reply(200, json.dumps(self.answers[path]).encode())
        else:
            self._reply(404, json.dumps({"message": f"No such object: {path}"}).encode())


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextmanager
def docker_api_stub(socket_path: Path, answers: dict[str, Any]) -> Iterator[str]:
    """Serve ``answers`` on ``socket_path``; yields the DOCKER_HOST to give the docker CLI."""
    handler = type("Handler", (_Handler,), {"answers": answers})
    server = _Server(str(socket_path), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"unix://{socket_path}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        socket_path.unlink(missing_ok=True)
