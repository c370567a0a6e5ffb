"""The transport under the registry client: connections, TLS, proxies, authentication, bounded reads.

Authentication follows the registry's ``WWW-Authenticate`` challenge, as docker and podman do: the
first ``GET /v2/`` (the ping) tells whether the registry wants ``Basic`` credentials or a ``Bearer``
token from a token server (``realm``, ``service``); tokens are fetched per repository scope
(``repository:NAME:pull`` or ``pull,push``), with the user's credentials if any, and cached. A 401 on
a later request is answered once by re-reading its challenge (it names the scope it wants).

Transport. ``tls_verify=True`` means HTTPS with certificate checks and nothing else.
``tls_verify=False`` is podman's ``--tls-verify=false``: HTTPS without certificate checks, falling back
to plain HTTP when the server does not speak TLS (a test registry on 127.0.0.1). Redirects are followed
(blob stores often answer with one), and credentials are never sent to another host. ``https_proxy``,
``http_proxy`` and ``no_proxy`` are honoured (a CONNECT tunnel for HTTPS); loopback addresses are never
proxied. Failures worth retrying (a dropped connection, a timeout, 429, 502-504) are raised as
:class:`TransientRegistryError`; the caller decides whether to retry.

Every body is read with a limit, and a transfer slower than the low-speed limit is abandoned.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import re
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

from lamina import __version__
from lamina.errors import RegistryError
from lamina.store.registry_manifest import try_json

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
READ_SIZE = 1024 * 1024
MAX_REDIRECTS = 5


class Readable(Protocol):
    """A request body read from a file: http.client reads it, and we rewind it to retry."""

    def read(self, size: int = -1, /) -> bytes: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...


@dataclass(frozen=True)
class LowSpeedLimit:
    """curl's ``--speed-limit``/``--speed-time``: a transfer that averages fewer than ``bytes_per_second``
    over ``seconds`` is aborted, so a registry that trickles a byte now and then cannot hold a pull
    forever (each byte resets the socket timeout). Set by ``LAMINA_SPEED_LIMIT`` (bytes/s, 0 turns it
    off) and ``LAMINA_SPEED_TIME`` (seconds)."""

    bytes_per_second: int = 1024
    seconds: float = 30.0

    @classmethod
    def from_environment(cls) -> LowSpeedLimit:
        try:
            return cls(int(os.environ.get("LAMINA_SPEED_LIMIT", cls.bytes_per_second)),
                       float(os.environ.get("LAMINA_SPEED_TIME", cls.seconds)))
        except ValueError:
            raise RegistryError("LAMINA_SPEED_LIMIT and LAMINA_SPEED_TIME must be numbers") from None

    def watch(self, what: str) -> SpeedWatch:
        return SpeedWatch(self, what)


class SpeedWatch:
    """One transfer measured against a :class:`LowSpeedLimit`."""

    def __init__(self, limit: LowSpeedLimit, what: str) -> None:
        self.limit = limit
        self.what = what
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def received(self, count: int) -> None:
        """Count ``count`` more bytes; RegistryError when the last window was too slow."""
        if self.limit.bytes_per_second <= 0:
            return
        self.window_bytes += count
        elapsed = time.monotonic() - self.window_start
        if elapsed < self.limit.seconds:
            return
        if self.window_bytes < self.limit.bytes_per_second * elapsed:
            raise RegistryError(f"{self.what}: slower than {self.limit.bytes_per_second} bytes/s for "
                                f"{self.limit.seconds:g} s, aborted (LAMINA_SPEED_LIMIT, LAMINA_SPEED_TIME)")
        self.window_start, self.window_bytes = time.monotonic(), 0


class TransientRegistryError(RegistryError):
    """A failure worth retrying: a dropped connection, a timeout, 429 or a 502/503/504."""


@dataclass
class _Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(header: str) -> _Challenge | None:
    """Parse ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    match = re.match(r"\s*([A-Za-z]+)\s*(.*)", header or "")
    if not match:
        return None
    scheme = match.group(1).lower()
    params = {key.lower(): (quoted if quoted is not None else bare)
              for key, quoted, bare in ((m.group(1), m.group(2), m.group(3))
                                        for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))',
                                                             match.group(2)))}
    if scheme not in ("basic", "bearer"):
        return None
    return _Challenge(scheme, params)


@dataclass
class _Proxy:
    netloc: str
    headers: dict[str, str]


def proxy_for(scheme: str, netloc: str) -> _Proxy | None:
    """The proxy for ``scheme://netloc`` from ``https_proxy``/``http_proxy``/``no_proxy``, as curl reads them."""
    host = urllib.parse.urlsplit(f"//{netloc}").hostname or netloc
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return None  # never proxied, as in Go's ProxyFromEnvironment (docker, podman)
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise RegistryError(f"unsupported {scheme}_proxy {url!r} (only http:// proxies are supported)")
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return _Proxy(f"{parts.hostname}:{parts.port or 80}", headers)


def tls_context(verify: bool, registry: str | None, cert_dir: Path | None) -> ssl.SSLContext:
    """The TLS settings for a connection to ``registry`` (its certs.d applied) or another host."""
    if verify:
        context = ssl.create_default_context()
    else:
        # Nothing is verified, so the system's CA bundle (slow to load) is not needed.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if registry is not None:
        load_registry_certs(context, registry, cert_dir)
    return context


def registry_cert_dirs(netloc: str, cert_dir: Path | None = None) -> list[Path]:
    """Where podman and docker keep a registry's own CAs and client certificates (``certs.d/HOST:PORT``).

    ``--cert-dir`` replaces them all, as in podman.
    """
    if cert_dir is not None:
        return [cert_dir]
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path(config_home) / "containers" / "certs.d" / netloc,
            Path("/etc/containers/certs.d") / netloc, Path("/etc/docker/certs.d") / netloc]


def load_registry_certs(context: ssl.SSLContext, netloc: str, cert_dir: Path | None = None) -> None:
    """Trust a registry's ``*.crt`` CAs and present its ``*.cert``/``*.key`` client certificate."""
    for directory in registry_cert_dirs(netloc, cert_dir):
        if not directory.is_dir():
            continue
        try:
            for ca in sorted(directory.glob("*.crt")):
                context.load_verify_locations(cafile=str(ca))
            for cert in sorted(directory.glob("*.cert")):
                key = cert.with_suffix(".key")
                if not key.is_file():
                    raise RegistryError(f"{cert}: client certificate without its key {key.name}")
                context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"certificates in {directory}: {e}") from None


@dataclass
class _Endpoint:
    scheme: str
    netloc: str
    verify: bool


class RegistrySession:
    """The HTTP side of one registry host (``host[:port]``): the ping, authentication, redirects.

    Resource handling: keeps at most one open HTTP(S) connection, reused across requests;
    :meth:`close` (or leaving a ``with`` block) closes it.

    Error handling: every failure (unreachable host, refused credentials, HTTP error) raises
    :class:`RegistryError` with a one-line message naming the request.
    """

    def __init__(self, registry: str, *, tls_verify: bool = True,
                 credentials: tuple[str, str] | None = None, timeout: float = 60.0,
                 cert_dir: Path | None = None, low_speed: LowSpeedLimit | None = None) -> None:
        if not registry or "/" in registry or any(c.isspace() for c in registry):
            raise RegistryError(f"invalid registry host: {registry!r}")
        self.registry = registry
        self.tls_verify = tls_verify
        self.credentials = credentials
        self.timeout = timeout
        self.cert_dir = cert_dir
        self.low_speed = low_speed or LowSpeedLimit.from_environment()
        self._tls_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._endpoint: _Endpoint | None = None
        self._challenge: _Challenge | None = None
        self._tokens: dict[str, str] = {}
        self._conn: http.client.HTTPConnection | None = None
        self._conn_key: tuple[str, str, bool] | None = None
        self._conn_proxy: _Proxy | None = None
        #: Every request sent, as ``(method, path)``; lets callers and tests count what was fetched.
        self.requests: list[tuple[str, str]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clone(self) -> Self:
        """A client for the same registry with its own connection, sharing what the ping and the token
        server answered (so parallel downloads need neither again). Each thread uses its own clone."""
        twin = type(self)(self.registry, tls_verify=self.tls_verify, credentials=self.credentials,
                              timeout=self.timeout, cert_dir=self.cert_dir, low_speed=self.low_speed)
        self._ping()
        twin._endpoint, twin._challenge, twin._tokens = self._endpoint, self._challenge, self._tokens
        twin._tls_contexts = self._tls_contexts
        return twin

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._conn_key = None

    # ----- transport -----

    def _connection(self, scheme: str, netloc: str, verify: bool) -> http.client.HTTPConnection:
        key = (scheme, netloc, verify)
        if self._conn is not None and self._conn_key == key:
            return self._conn
        self.close()
        proxy = proxy_for(scheme, netloc)
        conn: http.client.HTTPConnection
        if scheme == "https":
            # Loading the system's CA bundle costs tens of milliseconds and a pull opens many
            # connections: one context per kind, shared with clones, lives as long as the client.
            context_key = (verify, netloc if netloc == self.registry else None)
            if context_key not in self._tls_contexts:
                self._tls_contexts[context_key] = tls_context(verify, context_key[1], self.cert_dir)
            context = self._tls_contexts[context_key]
            if proxy is not None:
                # HTTPS through a proxy: a CONNECT tunnel, TLS end to end with the registry.
                conn = http.client.HTTPSConnection(proxy.netloc, timeout=self.timeout, context=context,
                                                   blocksize=READ_SIZE)
                conn.set_tunnel(netloc, headers=proxy.headers)
            else:
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=context,
                                                   blocksize=READ_SIZE)
        else:
            conn = http.client.HTTPConnection(proxy.netloc if proxy else netloc, timeout=self.timeout,
                                              blocksize=READ_SIZE)
        self._conn, self._conn_key = conn, key
        self._conn_proxy = proxy if scheme == "http" else None
        return conn

    def _send(self, method: str, url: str, headers: dict[str, str],
              body: bytes | Readable | None, verify: bool, body_start: int = 0) -> http.client.HTTPResponse:
        """Send one request (no auth, no redirects); retry once on a stale keep-alive connection.

        A file body is sent from ``body_start`` on every attempt.
        """
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": f"lamina/{__version__}", **headers}
        start = body_start
        for attempt in (1, 2):
            conn = self._connection(parts.scheme, parts.netloc, verify)
            if self._conn_proxy is not None:
                # Plain HTTP through a proxy: the absolute URL goes to the proxy.
                target = url
                headers = {**headers, **self._conn_proxy.headers}
            reused = conn.sock is not None
            try:
                if body is not None and not isinstance(body, bytes):
                    body.seek(start)
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 1 and reused:
                    log.debug("connection to %s went stale, reconnecting", parts.netloc)
                    continue
                raise TransientRegistryError(f"{method} {url}: connection lost: {e}") from None
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise RegistryError(f"{method} {url}: TLS certificate not trusted ({e.verify_message}); "
                                    "use --tls-verify=false for a registry without a trusted certificate") from None
            except TimeoutError:
                self.close()
                raise TransientRegistryError(f"{method} {url}: timed out after {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise RegistryError(f"{method} {url}: {e}") from None
            self.requests.append((method, parts.path))
            log.debug("%s %s -> %d", method, url, response.status)
            return response
        raise AssertionError("unreachable")

    def _base_url(self) -> str:
        endpoint = self._ping()
        return f"{endpoint.scheme}://{endpoint.netloc}"

    def _ping(self) -> _Endpoint:
        """``GET /v2/``: find the scheme that works and the authentication the registry wants."""
        if self._endpoint is not None:
            return self._endpoint
        attempts = [("https", self.tls_verify)]
        if not self.tls_verify:
            attempts.append(("http", False))
        last_error: RegistryError | None = None
        for scheme, verify in attempts:
            url = f"{scheme}://{self.registry}/v2/"
            try:
                response = self._send("GET", url, {}, None, verify)
            except RegistryError as e:
                log.debug("ping %s failed: %s", url, e)
                last_error = e
                continue
            body = self._read_limited(response, MAX_ERROR_BYTES)
            if response.status == 401:
                self._challenge = parse_www_authenticate(response.getheader("WWW-Authenticate", ""))
                if self._challenge is None:
                    raise RegistryError(f"GET {url}: 401 without a usable WWW-Authenticate challenge")
            elif response.status == 404 or response.status >= 500 or not 200 <= response.status < 300:
                raise RegistryError(f"GET {url}: {response.status} {response.reason}: "
                                    f"not an OCI registry? {_error_text(body)}")
            self._endpoint = _Endpoint(scheme, self.registry, verify)
            return self._endpoint
        assert last_error is not None
        raise RegistryError(f"cannot reach registry {self.registry}: {last_error}")

    def ping(self) -> None:
        """Check the registry answers the API and accepts our credentials (used by ``login``)."""
        self._ping()
        if self._challenge is not None:
            response = self._request("GET", "/v2/", scope=None)
            if response.status != 200:
                raise self._fail("GET /v2/", response)
            self._read_limited(response, MAX_ERROR_BYTES)

    # ----- authentication -----

    def _basic_header(self) -> str | None:
        if self.credentials is None:
            return None
        user, password = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _auth_header(self, scope: str | None) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic_header()
        key = scope or ""
        if key not in self._tokens:
            self._tokens[key] = self._fetch_token(challenge, scope)
        return f"Bearer {self._tokens[key]}"

    def _fetch_token(self, challenge: _Challenge, scope: str | None) -> str:
        """Ask the token server named by a Bearer challenge for a token (docker's token protocol)."""
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.registry} wants a Bearer token but names no realm")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry {self.registry} names an unusable token realm: {realm!r}")
        if parts.scheme == "http" and self.tls_verify:
            raise RegistryError(f"token realm {realm} is plain HTTP; use --tls-verify=false to allow it")
        query = urllib.parse.parse_qsl(parts.query)
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        # Several scopes (a cross-repository mount) go as repeated parameters, as docker sends them.
        query.extend(("scope", one) for one in (scope or "").split())
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/",
                                       urllib.parse.urlencode(query), ""))
        headers = {"Accept": "application/json"}
        basic = self._basic_header()
        if basic:
            headers["Authorization"] = basic
        response = self._send("GET", url, headers, None, self.tls_verify)
        body = self._read_limited(response, MAX_TOKEN_BYTES)
        if response.status == 401:
            raise RegistryError(f"token server {parts.netloc} refused the credentials for {self.registry}"
                                if self.credentials else
                                f"{self.registry}: authentication required (--creds USER:PASS or lamina login)")
        if response.status != 200:
            raise RegistryError(f"token server {parts.netloc}: {response.status} {response.reason}")
        answer = try_json(body)
        token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise RegistryError(f"token server {parts.netloc} sent no usable token")
        return token

    def _request(self, method: str, path_or_url: str, *, scope: str | None,
                 headers: dict[str, str] | None = None, body: bytes | Readable | None = None,
                 follow_redirects: bool = True) -> http.client.HTTPResponse:
        """One API request with authentication and redirects; the caller reads and closes the response."""
        base = self._base_url()
        url = path_or_url if "://" in path_or_url else base + path_or_url
        origin = urllib.parse.urlsplit(base).netloc
        headers = dict(headers or {})
        body_start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        retried_auth = False
        for _ in range(MAX_REDIRECTS + 1):
            netloc = urllib.parse.urlsplit(url).netloc
            send_headers = dict(headers)
            # Credentials go only to the registry itself, never to a host it redirects to.
            if netloc == origin:
                auth = self._auth_header(scope)
                if auth:
                    send_headers["Authorization"] = auth
            verify = self.tls_verify if url.startswith("https:") else False
            response = self._send(method, url, send_headers, body, verify, body_start)
            sent_basic = send_headers.get("Authorization", "").startswith("Basic ")
            if response.status == 401 and netloc == origin and not retried_auth and not sent_basic:
                challenge = parse_www_authenticate(response.getheader("WWW-Authenticate", ""))
                self._read_limited(response, MAX_ERROR_BYTES)
                retried_auth = True
                if challenge is None:
                    break
                self._challenge = challenge
                wanted = challenge.params.get("scope") or scope
                if challenge.scheme == "bearer":
                    self._tokens[scope or ""] = self._fetch_token(challenge, wanted)
                elif self.credentials is None:
                    raise RegistryError(f"{self.registry}: authentication required "
                                        "(--creds USER:PASS or lamina login)")
                continue
            if follow_redirects and response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                self._read_limited(response, MAX_ERROR_BYTES)
                if not location:
                    raise RegistryError(f"{method} {url}: redirect without a Location")
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                    raise RegistryError(f"{method}: redirect to an unsupported URL {url!r}")
                if response.status == 303:
                    method, body = "GET", None
                continue
            return response
        else:
            raise RegistryError(f"{method} {path_or_url}: too many redirects")
        return response

    def _fail(self, what: str, response: http.client.HTTPResponse) -> RegistryError:
        body = self._read_limited(response, MAX_ERROR_BYTES)
        if response.status == 401:
            if self.credentials:
                detail = _error_text(body)
                return RegistryError(f"{what} on {self.registry}: credentials refused"
                                     f"{' (' + detail + ')' if detail else ''}")
            return RegistryError(f"{self.registry}: authentication required (--creds USER:PASS or lamina login)")
        error_type = TransientRegistryError if response.status in (429, 502, 503, 504) else RegistryError
        return error_type(f"{what} on {self.registry}: {response.status} {response.reason}"
                          f"{': ' + _error_text(body) if body else ''}")

    def _read_limited(self, response: http.client.HTTPResponse, limit: int, what: str | None = None) -> bytes:
        """Read a whole response body, refusing one longer than ``limit`` when ``what`` names it.

        An error body longer than ``limit`` is cut short; the connection is then dropped, since the
        rest of the body would otherwise be read as the next response.
        """
        length = response.getheader("Content-Length")
        try:
            if what is not None and length and length.isdigit() and int(length) > limit:
                raise RegistryError(f"{what} is {length} bytes, more than the {limit} lamina accepts")
            data = self._read_at_most(response, limit + 1)
            if len(data) > limit:
                if what is not None:
                    raise RegistryError(f"{what} is larger than the {limit} bytes lamina accepts")
                self.close()
                return data[:limit]
            response.read()
            return data
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise RegistryError(f"reading a response from {self.registry}: {e}") from None
        except RegistryError:
            self.close()
            raise

    def _read_at_most(self, response: http.client.HTTPResponse, size: int) -> bytes:
        """Up to ``size`` bytes of the body, aborted when it comes slower than the low-speed limit."""
        speed = self.low_speed.watch(f"reading a response from {self.registry}")
        chunks: list[bytes] = []
        left = size
        while left > 0:
            chunk = response.read1(min(left, READ_SIZE))
            if not chunk:
                break
            speed.received(len(chunk))
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _error_text(body: bytes) -> str:
    """The registry's error message from an ``{"errors": [...]}`` body, else the first line of text."""
    answer = try_json(body)
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if isinstance(errors, list) and errors:
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                         for e in errors if isinstance(e, dict))
    text = body.decode("utf-8", "replace").strip().splitlines()
    return text[0][:200] if text else ""
