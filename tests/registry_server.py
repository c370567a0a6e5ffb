"""Registries for the tests, all bound to 127.0.0.1 only.

- :func:`run_registry`: Debian's ``docker-registry`` (the Distribution server) on a free port, with
  temporary storage, deletes enabled, an access log we can count requests in, and optional htpasswd
  basic auth. It waits for ``/v2/`` to answer (with a deadline) and always stops the server.
- :class:`FakeRegistry`: a tiny in-memory registry on ``http.server`` that can lie (serve a blob or a
  manifest whose bytes do not match the digest) and can demand Bearer tokens from a fake token server,
  for the tests a real registry cannot stage.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


def pulled_id(lamina_cmd, pulled: subprocess.CompletedProcess[str], root: Path | None = None) -> str:  # type: ignore[no-untyped-def]
    """The ID of the image ``lamina pull`` printed last: docker prints the full reference it pulled,
    and that reference must name the image in the store."""
    reference = pulled.stdout.strip().splitlines()[-1]
    shown = lamina_cmd("inspect", "--format", "{{.Id}}", reference, **({"root": root} if root else {}))
    return str(shown.stdout.strip().removeprefix("sha256:"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def bcrypt_hash(password: str) -> str | None:
    """A (cheap) bcrypt hash for an htpasswd file: ``htpasswd -nbB`` if installed, else libcrypt's."""
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbB", "-C", "4", "u", password], check=True, capture_output=True, text=True)
        return out.stdout.strip().split(":", 1)[1]
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        # The lowest cost bcrypt allows: the registry checks the hash on every request.
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    except (ImportError, AttributeError, OSError):
        return None
    return hashed if hashed and hashed.startswith("$2") else None


@dataclass
class RunningRegistry:
    port: int
    storage: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    cert: Path | None = None  # the self-signed certificate when serving HTTPS

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def access_log(self) -> list[tuple[str, str, int]]:
        """``(method, path, status)`` of every request the registry has answered so far."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.search(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)', line)
            if m:
                entries.append((m.group(1), m.group(2), int(m.group(3))))
        return entries

    def blob_gets(self) -> list[str]:
        """Digests of the blobs fetched (successful ``GET /v2/.../blobs/DIGEST``)."""
        return [path.rsplit("/", 1)[1] for method, path, status in self.access_log()
                if method == "GET" and "/blobs/sha256:" in path and status == 200]


@contextlib.contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve ``handler`` on 127.0.0.1 from a thread; yields the port, stops the server on exit."""
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class ForwardProxy:
    """An HTTP proxy: CONNECT tunnels and absolute-form requests, with every host resolved to 127.0.0.1.

    Since no name but localhost resolves on a test machine, reaching ``registry.test:PORT`` through
    it proves the client used the proxy. ``targets`` records each ``host:port`` asked for.
    """

    targets: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @contextlib.contextmanager
    def serve(self) -> Iterator[ForwardProxy]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go as separate writes

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self, upstream: socket.socket) -> None:
                def downstream() -> None:
                    with contextlib.suppress(OSError):
                        while data := upstream.recv(65536):
                            self.wfile.write(data)
                            self.wfile.flush()
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_WR)

                thread = threading.Thread(target=downstream, daemon=True)
                thread.start()
                with contextlib.suppress(OSError):
                    while data := self.rfile.read1(65536):
                        upstream.sendall(data)
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                thread.join(timeout=30)
                upstream.close()
                self.close_connection = True

            def _connect(self, target: str) -> socket.socket:
                proxy.targets.append(target)
                port = int(target.rsplit(":", 1)[1])
                return socket.create_connection((HOST, port), timeout=30)

            def do_CONNECT(self) -> None:
                upstream = self._connect(self.path)
                self.send_response(200, "Connection established")
                self.end_headers()
                self._relay(upstream)

            def _forward(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                upstream = self._connect(parts.netloc)
                origin_form = parts.path + (f"?{parts.query}" if parts.query else "")
                head = f"{self.command} {origin_form} {self.request_version}\r\n"
                head += "".join(f"{key}: {value}\r\n" for key, value in self.headers.items()) + "\r\n"
                upstream.sendall(head.encode("latin-1"))
                self._relay(upstream)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        with serve_http(Handler) as port:
            self.port = port
            yield self


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Docker's token protocol for a real registry: RS256 JWTs signed with ``openssl``.

    ``users`` maps user to password; a request with good basic credentials gets every action it
    asks for, an anonymous one gets ``anonymous_actions`` (default none). ``requests`` records the
    query of every token request.
    """

    tmp: Path
    users: dict[str, str]
    anonymous_actions: tuple[str, ...] = ()
    service: str = "lamina-test-registry"
    issuer: str = "lamina-test-issuer"
    port: int = 0
    requests: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.tmp / "token-key.pem"

    @property
    def cert(self) -> Path:
        return self.tmp / "token-cert.pem"

    @property
    def realm(self) -> str:
        return f"http://{HOST}:{self.port}/token"

    def make_keys(self) -> None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=lamina-test-token-issuer"],
                       check=True, capture_output=True, timeout=60)

    def sign(self, claims: dict) -> str:
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True, timeout=30).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True, capture_output=True, timeout=30).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def grant(self, query: list[tuple[str, str]], user: str | None) -> str:
        access = []
        for key, value in query:
            if key != "scope":
                continue
            kind, _, rest = value.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            granted = wanted if user is not None else [a for a in wanted if a in self.anonymous_actions]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        return self.sign({"iss": self.issuer, "sub": user or "", "aud": self.service, "exp": now + 300,
                          "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access})

    @contextlib.contextmanager
    def serve(self) -> Iterator[TokenServer]:
        server_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)
                server_self.requests.append(query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if server_self.users.get(name) != password:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = name
                body = json.dumps({"token": server_self.grant(query, user)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        with serve_http(Handler) as port:
            self.port = port
            yield self


@contextlib.contextmanager
def run_registry(tmp: Path, htpasswd: dict[str, str] | None = None, token: TokenServer | None = None,
                 tls: bool = False, timeout: float = 20.0) -> Iterator[RunningRegistry]:
    """Serve a fresh registry on 127.0.0.1; yields a :class:`RunningRegistry`, stops it on exit.

    ``htpasswd`` maps users to passwords and turns on basic auth (bcrypt entries). ``token`` (a
    serving :class:`TokenServer` with keys made) turns on Bearer-token auth instead. ``tls`` serves
    HTTPS with a self-signed certificate for 127.0.0.1, localhost and registry.test.
    """
    exe = shutil.which("docker-registry")
    if exe is None:
        raise RuntimeError("docker-registry is not installed (Debian package docker-registry)")
    tmp.mkdir(parents=True, exist_ok=True)
    storage = tmp / "storage"
    storage.mkdir()
    port = free_port()
    config, cert = _registry_config(tmp, storage, port, htpasswd, token, tls)
    (tmp / "config.yml").write_text("\n".join(config) + "\n")
    log_path = tmp / "registry.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([exe, "serve", str(tmp / "config.yml")], stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    registry = RunningRegistry(port, storage, log_path, process, cert)
    try:
        _wait_until_up(registry, tls, timeout)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _registry_config(tmp: Path, storage: Path, port: int, htpasswd: dict[str, str] | None,
                     token: TokenServer | None, tls: bool) -> tuple[list[str], Path | None]:
    """docker-registry's config.yml, as lines, and the certificate it serves (if ``tls``)."""
    config = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {HOST}:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    cert: Path | None = None
    if tls:
        cert, key = tmp / "registry-cert.pem", tmp / "registry-key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=registry.test",
                        "-addext", "subjectAltName=DNS:registry.test,DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        config += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
    if htpasswd is not None:
        lines = []
        for user, password in htpasswd.items():
            hashed = bcrypt_hash(password)
            if hashed is None:
                raise RuntimeError("no bcrypt available (htpasswd or crypt blowfish) for an htpasswd file")
            lines.append(f"{user}:{hashed}")
        (tmp / "htpasswd").write_text("\n".join(lines) + "\n")
        config += ["auth:", "  htpasswd:", "    realm: lamina-test", f"    path: {tmp / 'htpasswd'}"]
    elif token is not None:
        config += ["auth:", "  token:", f"    realm: {token.realm}", f"    service: {token.service}",
                   f"    issuer: {token.issuer}", f"    rootcertbundle: {token.cert}"]
    return config, cert


def _wait_until_up(registry: RunningRegistry, tls: bool, timeout: float) -> None:
    """Poll ``/v2/`` until the registry answers (a 401 counts); RuntimeError if it exits or is late."""
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        if registry.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {registry.process.returncode}: "
                               f"{registry.log_path.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{'https' if tls else 'http'}://{registry.address}/v2/", timeout=2,
                                        context=insecure if tls else None):
                return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and wants credentials
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"docker-registry did not answer on {registry.address} within {timeout} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# A fake registry that can lie, and a fake token server.


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_blob(files: dict[str, bytes]) -> bytes:
    """A gzip layer tar holding ``files`` (parents included), deterministic."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parts) - 1)})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _uncompressed(blob: bytes) -> tuple[bytes, str]:
    """The tar inside a gzip, zstd or plain layer blob, and the layer's OCI media type."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob), "application/vnd.oci.image.layer.v1.tar+gzip"
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(blob), \
            "application/vnd.oci.image.layer.v1.tar+zstd"
    return blob, "application/vnd.oci.image.layer.v1.tar"


def oci_image(layers: list[bytes], arch: str | None = None) -> tuple[bytes, bytes]:
    """(config, OCI manifest) bytes of a linux image of ``layers`` (gzip, zstd or plain tar blobs)."""
    from lamina.store.registry_manifest import OCI_MANIFEST, host_platform

    tars = [_uncompressed(blob) for blob in layers]
    config = json.dumps({
        "architecture": arch or host_platform().architecture, "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(tar) for tar, _ in tars]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": [{"mediaType": media_type, "digest": digest_of(blob), "size": len(blob)}
                   for blob, (_, media_type) in zip(layers, tars, strict=True)],
    }).encode()
    return config, manifest


@dataclass
class FakeRegistry:
    """An in-memory, read-only registry. Populate ``blobs`` and ``manifests`` then :meth:`serve`.

    ``manifests`` maps ``(repository, tag_or_digest)`` to ``(media_type, bytes)``. Lies:
    ``blob_override[digest] = bytes`` serves other bytes for a blob; ``manifest_digest_header``
    overrides the Docker-Content-Digest header. ``redirect_blobs`` answers blob GETs with a 307 to
    ``http://localhost:PORT/blobstore/DIGEST`` (another host name, like a CDN). ``stall_after=N`` sends
    the first N bytes of every larger blob, sets ``stalled`` and waits for ``release`` (at most 30 s), for
    tests that kill a client mid-download. The first ``failing_blob_gets`` blob GETs fail: with a 503
    (``failure="503"``) or by closing the connection half way (``failure="truncate"``). ``blob_delay``
    holds every blob GET that long; ``max_in_flight`` is the most blob GETs ever served at once.
    ``trickle=S`` sends every blob body one byte every S seconds (a registry too slow to wait for).
    ``Range: bytes=N-`` and ``bytes=N-M`` are honoured (206) unless ``ranges`` is False; ``range_requests`` records them. With ``bearer`` set, every ``/v2/`` request needs a
    token from the token server (which wants basic credentials ``token_user:token_password`` if set).
    """

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blob_override: dict[str, bytes] = field(default_factory=dict)
    manifest_digest_header: dict[tuple[str, str], str] = field(default_factory=dict)
    bearer: bool = False
    redirect_blobs: bool = False
    stall_after: int | None = None
    failing_blob_gets: int = 0
    failure: str = "503"
    blob_delay: float = 0.0
    trickle: float | None = None
    ranges: bool = True
    range_requests: list[str] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    token_user: str | None = None
    token_password: str | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    _issued: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_image(self, repository: str, tag: str, layers: list[bytes]) -> tuple[bytes, bytes]:
        """Serve an image of ``layers`` as ``repository:tag``; returns (config, manifest) bytes."""
        from lamina.store.registry_manifest import OCI_MANIFEST

        config, manifest = oci_image(layers)
        for blob in (*layers, config):
            self.add_blob(blob)
        self.add_manifest(repository, tag, OCI_MANIFEST, manifest)
        return config, manifest

    def add_manifest(self, repository: str, tag: str | None, media_type: str, data: bytes) -> str:
        digest = digest_of(data)
        self.manifests[(repository, digest)] = (media_type, data)
        if tag:
            self.manifests[(repository, tag)] = (media_type, data)
        return digest

    @contextlib.contextmanager
    def serve(self) -> Iterator[FakeRegistry]:
        handler = type("Handler", (_FakeRegistryHandler,), {"fake": self})
        with serve_http(handler) as port:
            self.port = port
            try:
                yield self
            finally:
                self.release.set()  # let a stalled handler finish before the server stops


class _FakeRegistryHandler(http.server.BaseHTTPRequestHandler):
    """Answers for one :class:`FakeRegistry` (``fake``, set by :meth:`FakeRegistry.serve`)."""

    fake: FakeRegistry
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go as separate writes

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_headers(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _token(self) -> None:
        fake = self.fake
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        fake.token_requests.append(query)
        if fake.token_user is not None:
            want = "Basic " + base64.b64encode(f"{fake.token_user}:{fake.token_password}".encode()).decode()
            if self.headers.get("Authorization") != want:
                self._send(401, b'{"details":"bad credentials"}')
                return
        token = secrets.token_hex(8)
        fake._issued[token] = query.get("scope", "")
        self._send(200, json.dumps({"token": token}).encode(), {"Content-Type": "application/json"})

    def _authorized(self, scope: str) -> bool:
        fake = self.fake
        if not fake.bearer:
            return True
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and fake._issued.get(auth[7:]) is not None:
            granted = fake._issued[auth[7:]]
            if scope == "" or scope in granted.split(" "):
                return True
        challenge = f'Bearer realm="http://{fake.address}/token",service="fake-registry"'
        if scope:
            challenge += f',scope="{scope}"'
        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}',
                   {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        return False

    def do_GET(self) -> None:
        fake = self.fake
        path = urllib.parse.urlsplit(self.path).path
        fake.requests.append((self.command, path, self.headers.get("Authorization")))
        if path == "/token":
            self._token()
            return
        if path.startswith("/blobstore/"):
            data = fake.blobs.get(path.rsplit("/", 1)[1])
            self._send(200 if data is not None else 404, data or b"")
            return
        if path == "/v2/":
            if self._authorized(""):
                self._send(200, b"{}")
            return
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if not m:
            self._send(404)
            return
        repository, kind, ref = m.groups()
        if not self._authorized(f"repository:{repository}:pull"):
            return
        if kind == "blobs":
            self._blob(ref)
            return
        if (repository, ref) not in fake.manifests:
            self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
            return
        media_type, data = fake.manifests[(repository, ref)]
        announced = fake.manifest_digest_header.get((repository, ref), digest_of(data))
        self._send(200, data, {"Content-Type": media_type, "Docker-Content-Digest": announced})

    do_HEAD = do_GET

    def _blob(self, ref: str) -> None:
        fake = self.fake
        if ref not in fake.blobs:
            self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
            return
        if fake.redirect_blobs:
            self._send(307, b"", {"Location": f"http://localhost:{fake.port}/blobstore/{ref}"})
            return
        data = fake.blob_override.get(ref, fake.blobs[ref])
        get = self.command == "GET"
        if fake.blob_delay and get:
            with fake._lock:
                fake._in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
            time.sleep(fake.blob_delay)
            with fake._lock:
                fake._in_flight -= 1
        if fake.failing_blob_gets > 0 and get:
            fake.failing_blob_gets -= 1
            self._fail_blob(data)
            return
        if get and self._ranged_blob(data):
            return
        if fake.trickle is not None and get:
            self._trickle_blob(data, fake.trickle)
            return
        if fake.stall_after is not None and get and len(data) > fake.stall_after:
            self._stall_blob(data, fake.stall_after)
            return
        self._send(200, data, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref})

    def _fail_blob(self, data: bytes) -> None:
        """A 503, or (``failure="truncate"``) half the body and a closed connection."""
        if self.fake.failure == "503":
            self._send(503, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}')
            return
        self._send_headers(len(data))
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True

    def _ranged_blob(self, data: bytes) -> bool:
        """Answer a ``Range: bytes=N-`` request with a 206 (when ranges are on); False if not one."""
        wanted = self.headers.get("Range")
        if not wanted:
            return False
        self.fake.range_requests.append(wanted)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
        if not (self.fake.ranges and m and int(m.group(1)) < len(data)):
            return False
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
        self._send(206, data[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        return True

    def _trickle_blob(self, data: bytes, interval: float) -> None:
        self._send_headers(len(data))
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(interval)

    def _stall_blob(self, data: bytes, after: int) -> None:
        self._send_headers(len(data))
        with contextlib.suppress(OSError):
            self.wfile.write(data[:after])
            self.wfile.flush()
        self.fake.stalled.set()
        self.fake.release.wait(30)
        with contextlib.suppress(OSError):
            self.wfile.write(data[after:])


__all__ = ["FakeRegistry", "RunningRegistry", "bcrypt_hash", "digest_of", "ForwardProxy", "TokenServer", "free_port", "layer_blob", "oci_image", "run_registry"]
