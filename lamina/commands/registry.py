"""``lamina pull``, ``lamina push``, ``lamina login`` and ``lamina logout``: flags in, one line out.

The work is :mod:`lamina.store.transfer` (pull, push) and :mod:`lamina.store.registry_auth`
(credentials).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import sys
from pathlib import Path
from typing import TextIO

from lamina.application import open_store
from lamina.errors import UsageError
from lamina.store.reference import DEFAULT_REGISTRY, Reference
from lamina.store.registry import RegistryClient
from lamina.store.registry_auth import lookup_credentials, parse_creds, remove_credentials, store_credentials
from lamina.store.registry_manifest import Platform
from lamina.store.transfer import Progress, api_host, default_tls_verify, pull, push_image, strip_transport

log = logging.getLogger(__name__)


def _progress_stream(quiet: bool) -> TextIO | None:
    """Progress goes to stdout as docker's does: redrawn in place on a terminal, line by line in a
    pipe; errors stay on stderr."""
    return None if quiet else sys.stdout


def names_tag_or_digest(text: str) -> bool:
    """Whether the reference ``text`` names a tag or a digest (rather than defaulting to latest)."""
    return "@" in text or ":" in text.rsplit("/", 1)[-1]


def cmd_pull(args: argparse.Namespace) -> int:
    store = open_store(args.layout)
    credentials = parse_creds(args.creds) if args.creds else None
    text = strip_transport(args.reference)
    ref = Reference.parse(text)
    if not args.quiet and not names_tag_or_digest(text):
        print(f"Using default tag: {ref.tag}", flush=True)
    pull(store, text, tls_verify=args.tls_verify, credentials=credentials,
         platform=args.platform, progress_stream=_progress_stream(args.quiet), cert_dir=args.cert_dir)
    # docker pull ends with the full reference it pulled (docker.io/library/busybox:latest), with
    # -q as its only line; podman prints the image ID instead (see docs/docker-compatibility.md).
    print(ref)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    store = open_store(args.layout)
    if args.estargz_prioritize and args.compression_format != "estargz":
        raise UsageError("push: --estargz-prioritize needs --compression-format estargz")
    source = strip_transport(args.source)
    destination = strip_transport(args.destination) if args.destination else None
    # Held while blobs are read, so that a concurrent prune cannot remove them under us.
    with store.lock(shared=True):
        image = store.resolve_image(source)
        if destination is None and image.id.startswith(source.removeprefix("sha256:")):
            raise UsageError(f"push: {source} is an image ID; give a destination [HOST/]NAME[:TAG]")
        dest = Reference.parse(destination or source)
        if dest.digest and not dest.tag:
            raise UsageError(f"push: destination {dest} names a digest; give a tag")
        progress = Progress(_progress_stream(args.quiet))
        credentials = parse_creds(args.creds) if args.creds else lookup_credentials(dest.registry)
        with RegistryClient(api_host(dest.registry), tls_verify=default_tls_verify(dest.registry, args.tls_verify),
                            credentials=credentials, cert_dir=args.cert_dir) as client, \
                contextlib.ExitStack() as cleanup:
            converted = None
            if args.compression_format == "estargz":
                from lamina.store.estargz_push import open_estargz_image  # only when asked: it is not small

                converted = cleanup.enter_context(open_estargz_image(store, store.manifest_bytes(image), store.layout.tmp,
                                                                     prioritized=args.estargz_prioritize))
            digest, size = push_image(store, image, dest, client, progress, converted)
    # docker push -q prints the reference it pushed, and nothing else.
    print(str(dest) if args.quiet else f"{dest.tag}: digest: {digest} size: {size}")
    return 0


def _registry_arg(text: str) -> str:
    text = text.removeprefix("https://").removeprefix("http://").rstrip("/")
    if not text or "/" in text:
        raise UsageError(f"login: expected a registry host[:port], got {text!r}")
    return DEFAULT_REGISTRY if text in ("index.docker.io", "registry-1.docker.io") else text


def cmd_login(args: argparse.Namespace) -> int:
    registry = _registry_arg(args.registry)
    user = args.username
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
    else:
        if not sys.stdin.isatty():
            raise UsageError("login: no password given (use --password-stdin or -p)")
        user = user or input("Username: ")
        password = getpass.getpass("Password: ")
    if not user:
        raise UsageError("login: --username is required")
    with RegistryClient(api_host(registry), tls_verify=default_tls_verify(registry, args.tls_verify),
                        credentials=(user, password),
                        cert_dir=args.cert_dir) as client:
        client.ping()
    path = store_credentials(registry, user, password)
    log.debug("credentials for %s written to %s", registry, path)
    print("Login Succeeded!")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    registry = _registry_arg(args.registry)
    if not remove_credentials(registry):
        raise UsageError(f"logout: not logged in to {registry}")
    print(f"Removed login credentials for {registry}")
    return 0


def _platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(f"expected OS/ARCH[/VARIANT], got {text!r}")
    return Platform(*parts)


def _tls_verify(text: str) -> bool:
    value = text.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-verify", type=_tls_verify, nargs="?", const=True, default=None, metavar="BOOL",
                        help="require HTTPS with a trusted certificate (default true, except for registries "
                             "on the loopback network, as docker); false also allows plain HTTP")
    parser.add_argument("--cert-dir", type=Path, metavar="DIR",
                        help="the registry's CAs (*.crt) and client certificate (*.cert + *.key) "
                             "(default: containers/certs.d/HOST:PORT as podman)")


def _add_transfer_options(parser: argparse.ArgumentParser, quiet_help: str) -> None:
    _add_tls(parser)
    parser.add_argument("--creds", metavar="USER:PASS",
                        help="credentials for the registry (default: those stored by lamina/podman login)")
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    pull = subparsers.add_parser("pull", help="download an image from a registry",
                                 description="Download an image (only the layers the store lacks).")
    pull.add_argument("reference", metavar="REF", help="[HOST[:PORT]/]NAME[:TAG|@DIGEST]")
    _add_transfer_options(pull, quiet_help="no progress, only the reference pulled")
    pull.add_argument("--platform", type=_platform, metavar="OS/ARCH[/VARIANT]",
                      help="which image of a multi-platform index (default: this host's)")
    pull.set_defaults(handler=cmd_pull)

    push = subparsers.add_parser("push", help="upload an image to a registry",
                                 description="Upload an image (only the blobs the registry lacks).")
    push.add_argument("source", metavar="IMAGE", help="image in the store (name or ID)")
    push.add_argument("destination", metavar="DEST", nargs="?", help="[HOST[:PORT]/]NAME[:TAG] (default IMAGE)")
    _add_transfer_options(push, quiet_help="no progress, only the reference pushed")
    push.add_argument("--compression-format", choices=["estargz"], default=None,
                      help="estargz: push the layers as eStargz (gzip that can be read lazily, "
                           "with a new config for their new diff_ids); default: as stored")
    push.add_argument("--estargz-prioritize", action="append", default=[], metavar="PATH",
                      help="with estargz: put PATH first in its layer, before the prefetch landmark, "
                           "so that lazy mounts fetch it at once (repeatable)")
    push.set_defaults(handler=cmd_push)

    login = subparsers.add_parser("login", help="store credentials for a registry",
                                  description="Check and store credentials (podman's auth.json).")
    login.add_argument("registry", metavar="REGISTRY")
    login.add_argument("-u", "--username")
    login.add_argument("-p", "--password")
    login.add_argument("--password-stdin", action="store_true")
    _add_tls(login)
    login.set_defaults(handler=cmd_login)

    logout = subparsers.add_parser("logout", help="forget the credentials for a registry")
    logout.add_argument("registry", metavar="REGISTRY")
    logout.set_defaults(handler=cmd_logout)
