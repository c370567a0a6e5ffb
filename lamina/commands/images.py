"""The image store's verbs: images, tag, rmi, inspect, history, import, save, load, system.

Output follows docker's (columns, 12-character IDs, "2 minutes ago", decimal human sizes), so that
scripts and people used to docker read it without surprise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lamina.application import open_store
from lamina.commands.formatting import (
    INSPECT_PARSE_EXIT,
    TemplateError,
    context,
    format_kind,
    go_human_size,
    go_time,
    parse_format,
    print_table,
    render_rows,
    since,
)
from lamina.errors import ContainerNotFound, ImageNotFound, LaminaError, StoreError, UsageError
from lamina.layout import Layout
from lamina.store.blobs import CHUNK, temp_name
from lamina.store.progress import LayerProgress, human_size
from lamina.store.reference import Reference
from lamina.store.store import Image, Store

log = logging.getLogger(__name__)

# lamina.store.archive's DOCKER_ARCHIVE and OCI_ARCHIVE (tests/test_cli.py checks): that module, with
# every decompressor, is imported only by the verbs that read or write archives.
ARCHIVE_FORMATS = ("docker-archive", "oci-archive")
# docker's save and import print no progress: in a pipe lamina's stay silent this long, and a
# longer one shows per-layer lines (on a terminal, bars at once).
SILENT_FOR = 3.0


def _open(args: argparse.Namespace) -> Store:
    return open_store(args.layout)


# --- images --------------------------------------------------------------------------------------


def cmd_images(args: argparse.Namespace) -> int:
    store = _open(args)
    present = _lazy_presence(store)
    images = sorted(store.images() + [image for image, _ in present.values()],
                    key=lambda i: (i.created or dt.datetime.min.replace(tzinfo=dt.UTC)), reverse=True)
    from lamina.commands.filters import ImageFilter

    image_filter = ImageFilter(store, args.filter)
    images = [i for i in images if image_filter.matches(i)]
    wanted: Reference | None = None
    explicit_tag = False
    if args.repository:
        wanted = Reference.parse(args.repository)
        explicit_tag = ":" in args.repository.rsplit("/", 1)[-1]

    def shown(ref: Reference) -> bool:
        return image_filter.shows_name(ref.familiar) and \
            (wanted is None or (ref.name == wanted.name and (not explicit_tag or ref.tag == wanted.tag)))

    if wanted is not None:
        images = [i for i in images if any(shown(Reference.parse(t)) for t in i.tags)]
    if format_kind(args.format) != "default" and not args.quiet:
        # docker shows digests only when asked, or when the format names {{.Digest}} as such
        digests = getattr(args, "digests", False) or "{{.Digest}}" in args.format
        contexts = [image_context(image, ref, args.no_trunc, digests, _present_text(present, image))
                    for image in images for ref in _shown_names(image, shown)]
        sys.stdout.write(render_rows(args.format, contexts, IMAGE_HEADER))
        return 0
    if args.quiet:
        seen: set[str] = set()
        for image in images:
            id_text = ("sha256:" + image.id) if args.no_trunc else image.short_id
            if id_text not in seen:
                seen.add(id_text)
                print(id_text)
        return 0
    # PRESENT (lamina's own column) only when a lazy image is listed: docker's table otherwise.
    lazy_shown = any(image.id in present for image in images)
    rows = [["REPOSITORY", "TAG", *(["DIGEST"] if args.digests else []), "IMAGE ID", "CREATED", "SIZE",
             *(["PRESENT"] if lazy_shown else [])]]
    for image in images:
        shown_id = ("sha256:" + image.id) if args.no_trunc else image.short_id
        names: list[Reference | None] = [r for r in map(Reference.parse, image.tags) if shown(r)] or [None]
        for ref in names:
            repo = ref.familiar_name if ref else "<none>"
            tag = (ref.tag or "<none>") if ref else "<none>"
            digest = [image.manifest_digest] if args.digests else []
            rows.append([repo, tag, *digest, shown_id, since(image.created), human_size(image.size),
                         *([_present_text(present, image) or "100%"] if lazy_shown else [])])
    print_table(rows)
    return 0


def _lazy_presence(store: Store) -> dict[str, tuple[Image, str]]:
    """The lazy images not (yet) in the store, by ID: each as an Image, and how much of it is here."""
    from lamina.lazy import images as lazy_images

    found = {}
    ordinary = set(store.image_ids())
    for lazy in lazy_images.all_images(store.layout):
        if lazy.id not in ordinary:
            presence = lazy_images.presence(store.layout, lazy)
            found[lazy.id] = (lazy_images.as_image(lazy), f"{presence.percent:.0f}%")
    return found


def _present_text(present: dict[str, tuple[Image, str]], image: Image) -> str | None:
    """How much of ``image`` is here when it is lazy; None for an ordinary image."""
    return present[image.id][1] if image.id in present else None


def _shown_names(image: Image, shown: Callable[[Reference], bool]) -> list[Reference | None]:
    """The names of ``image`` that ``images`` lists, or [None] for one <none> row."""
    return [r for r in map(Reference.parse, image.tags) if shown(r)] or [None]


# docker's imageContext: its header names and its fields (github docker/cli formatter/image.go)
IMAGE_HEADER = {"ID": "IMAGE ID", "Repository": "REPOSITORY", "Tag": "TAG", "Digest": "DIGEST",
                "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "Size": "SIZE", "Containers": "CONTAINERS",
                "SharedSize": "SHARED SIZE", "UniqueSize": "UNIQUE SIZE", "Present": "PRESENT"}


def image_context(image: Image, ref: Reference | None, no_trunc: bool, digests: bool,
                  present: str | None = None) -> Any:
    """One row of ``images --format``: an image under one of its names, as docker shows it.

    ``present`` (how much of a lazy image is here) is lamina's own ``{{.Present}}``; ``json``
    shows it only for a lazy image, so an ordinary image's row has docker's fields exactly."""
    from lamina.gotemplate import GoStruct

    row = image_fields(image, ref, no_trunc, digests)
    row["Present"] = present or "100%"
    shown = row if present is not None else {k: v for k, v in row.items() if k != "Present"}
    return GoStruct("*formatter.imageContext", row, json_fields=lambda: shown)


def image_fields(image: Image, ref: Reference | None, no_trunc: bool, digests: bool) -> dict[str, Any]:
    """docker's fields of one ``images`` row."""
    return {
        "ID": ("sha256:" + image.id) if no_trunc else image.short_id,
        "Repository": ref.familiar_name if ref else "<none>",
        "Tag": (ref.tag or "<none>") if ref else "<none>",
        "Digest": (image.manifest_digest if digests and ref else None) or "<none>",
        "CreatedSince": since(image.created) if image.created else "",
        "CreatedAt": go_time(image.created),
        "Size": human_size(image.size),
        "Containers": "N/A", "SharedSize": "N/A", "UniqueSize": "N/A",
        "VirtualSize": go_human_size(image.size, 4),  # docker 28.2 still has it; later ones drop it
    }


# --- tag, rmi ------------------------------------------------------------------------------------


def cmd_tag(args: argparse.Namespace) -> int:
    store = _open(args)
    image = store.resolve_image(args.source)
    for target in args.target:
        store.tag(image, target)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    store = _open(args)
    failures = 0
    for name in args.images:
        try:
            for line in remove_image(store, name, args.force):
                print(line)
        except LaminaError as e:
            if args.force and isinstance(e, ImageNotFound):
                # docker's `rmi -f` reports an image that does not exist, and succeeds.
                print(f"lamina: error: {e}", file=sys.stderr)
                continue
            if len(args.images) == 1:
                raise
            print(f"lamina: error: {e}", file=sys.stderr)
            failures += 1
    if failures:
        raise StoreError(f"{failures} of {len(args.images)} images could not be removed")
    return 0


def _remove_lazy_image(store: Store, name: str, force: bool) -> list[str]:
    """rmi of a lazy image (lamina.lazy): its record and what was fetched of its layers go
    (refused while a container uses it, unless forced: a running one keeps its layer server)."""
    from lamina.lazy import images as lazy_images

    lazy = lazy_images.find(store.layout, name)
    users = store.containers_using(lazy.id)
    if users and not force:
        raise StoreError(f"image {name} is in use by container(s) {', '.join(u[:12] for u in users)}; "
                         "remove them first or use -f")
    lazy_images.remove(store.layout, lazy.id)
    return [*(f"Untagged: {Reference.parse(tag).familiar}" for tag in lazy.tags), f"Deleted: sha256:{lazy.id}"]


def remove_image(store: Store, name: str, force: bool) -> list[str]:
    """docker's rmi: a tag with siblings is only untagged; the last name (or an ID) deletes."""
    try:
        image = store.resolve_image(name)
    except ImageNotFound:
        return _remove_lazy_image(store, name, force)
    lines: list[str] = []
    by_tag = False
    ref: Reference | None = None
    try:
        ref = Reference.parse(name)
        by_tag = ref.tag is not None and ref.familiar in image.tags
    except UsageError:
        pass
    users = store.containers_using(image.id)
    if by_tag and ref is not None and len(image.tags) > 1:
        store.untag(name)
        return [f"Untagged: {ref.familiar}"]
    if not by_tag and len(image.tags) > 1 and not force:
        raise StoreError(f"unable to delete {image.short_id} (must be forced): image is referenced in "
                         f"multiple repositories ({', '.join(image.tags)})")
    if users:
        if not force:
            raise StoreError(f"image {name} is in use by container(s) {', '.join(u[:12] for u in users)}; "
                             "remove them first or use -f to untag it")
        for tag in image.tags:
            store.untag(tag)
            lines.append(f"Untagged: {tag}")
        return lines
    for tag in image.tags:
        lines.append(f"Untagged: {tag}")
    store.delete_image(image)
    lines.append(f"Deleted: sha256:{image.id}")
    return lines


# --- inspect, history ----------------------------------------------------------------------------


def image_inspect(store: Store, image: Image) -> dict[str, Any]:
    cfg = image.config
    return {
        "Id": "sha256:" + image.id,
        "Digest": image.manifest_digest,
        "RepoTags": image.tags,
        "RepoDigests": [f"{Reference.parse(t).familiar_name}@{image.manifest_digest}" for t in image.tags],
        "Created": cfg.get("created"),
        "Author": cfg.get("author", ""),
        "Architecture": cfg.get("architecture"),
        "Os": cfg.get("os"),
        "Config": cfg.get("config", {}),
        "RootFS": {"Type": "layers", "Layers": [layer.diff_id for layer in image.layers]},
        "Size": image.size,
        "History": cfg.get("history", []),
        "Manifest": image.manifest,
        "GraphDriver": {"Name": "lamina-unionfs",
                        "Data": {"LowerDir": ":".join(str(p) for p in store.layer_stack(image).top_down())}},
    }


def _lazy_inspect(store: Store, name: str) -> dict[str, Any] | None:
    """``inspect`` of a lazy image: docker's fields, no lower directories yet, and ``Lazy``."""
    from lamina.lazy import images as lazy_images

    try:
        lazy = lazy_images.find(store.layout, name)
    except ImageNotFound:
        try:  # filled between the two lookups: an ordinary image now
            return image_inspect(store, store.resolve_image(name))
        except ImageNotFound:
            return None
    image = lazy_images.as_image(lazy)
    found = image_inspect(store, image)
    found["GraphDriver"]["Data"] = {}
    found["Lazy"] = lazy_images.presence_json(lazy_images.presence(store.layout, lazy))
    return found


def _inspect_container(layout: Layout, name: str) -> dict[str, Any] | None:
    """The runner's view of the container ``name``, or None when there is none."""
    from runner.state import inspect_container

    try:
        return inspect_container(layout, name)
    except (ContainerNotFound, ImageNotFound):
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.format:
        parse_format(args.format, INSPECT_PARSE_EXIT)  # before any lookup, as docker does
    store = _open(args)
    results: list[dict[str, Any]] = []
    missing = []
    for name in args.names:
        found: dict[str, Any] | None = None
        if args.type in ("image", None):
            try:
                found = image_inspect(store, store.resolve_image(name))
            except ImageNotFound:
                found = _lazy_inspect(store, name)
        if found is None and args.type in ("container", None):
            found = _inspect_container(args.layout, name)
        if found is None:
            missing.append(name)
        else:
            results.append(found)
    errors: list[str] = []
    if args.format:
        from lamina.commands.inspect_format import render_inspect

        text, errors = render_inspect(args.format, results)
        sys.stdout.write(text)
    else:
        print(json.dumps(results, indent=4))
    if errors and not missing:
        raise TemplateError("\n".join(errors))
    if missing:
        raise ImageNotFound(", ".join(missing)) if args.type == "image" or len(missing) == len(args.names) \
            else LaminaError(f"no such object: {', '.join(missing)}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    store = _open(args)
    image = store.resolve_image(args.image)
    rows = history_rows(image)
    if format_kind(args.format) != "default" and not args.quiet:
        contexts = [history_context(row, args.no_trunc) for row in rows]
        sys.stdout.write(render_rows(args.format, contexts, HISTORY_HEADER))
        return 0
    if args.quiet:
        for row in rows:
            print(row["id"] if args.no_trunc or row["id"] == "<missing>" else row["id"][:12])
        return 0
    table = [["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    for row in rows:
        created_by = row["created_by"]
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        shown = row["id"] if args.no_trunc or row["id"] == "<missing>" else row["id"][:12]
        table.append([shown, since(row["created_at"]), created_by, human_size(row["size"]), row["comment"]])
    print_table(table)
    return 0


HISTORY_HEADER = {"ID": "IMAGE", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT",
                  "CreatedBy": "CREATED BY", "Size": "SIZE", "Comment": "COMMENT"}


def history_context(row: dict[str, Any], no_trunc: bool) -> Any:
    """One row of ``history --format``, as docker's historyContext."""
    created_by = row["created_by"].replace("\t", " ")
    if not no_trunc and len(created_by) > 45:
        created_by = created_by[:44] + "…"
    shown_id = row["id"] if no_trunc or row["id"] == "<missing>" else row["id"][:12]
    created = row["created_at"]
    return context("*image.historyContext", {
        "ID": ("sha256:" + shown_id) if no_trunc and shown_id != "<missing>" else shown_id,
        "CreatedSince": since(created) if created else "N/A",
        "CreatedAt": created.astimezone().isoformat(timespec="seconds").replace("+00:00", "Z") if created else "",
        "CreatedBy": created_by, "Size": human_size(row["size"]), "Comment": row["comment"],
    })


def history_rows(image: Image) -> list[dict[str, Any]]:
    """One row per history entry, newest first; empty layers have size 0."""
    from lamina.timeparse import parse_time

    history = image.config.get("history") or [{} for _ in image.layers]
    layers = iter(image.layers)
    rows = []
    for entry in history:
        layer = None if entry.get("empty_layer") else next(layers, None)
        rows.append({
            "id": "", "created": entry.get("created"), "created_at": parse_time(entry.get("created")),
            "created_by": entry.get("created_by", ""), "size": layer.size if layer else 0,
            "comment": entry.get("comment", ""), "empty_layer": bool(entry.get("empty_layer")),
        })
    rows.reverse()
    for i, row in enumerate(rows):
        row["id"] = image.id if i == 0 else "<missing>"
    return rows


# --- import, save, load --------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    store = _open(args)
    tags = [args.reference] if args.reference else []
    for tag in tags:
        Reference.parse(tag)
    from lamina.store.importer import import_tarball

    # Progress on stderr: standard output is the image ID, which scripts read.
    progress = LayerProgress.to_stream(None if args.quiet else sys.stderr, silent_for=SILENT_FOR)
    image = import_tarball(store, args.tarball, tags, args.change or [], args.message, progress)
    print(f"sha256:{image.id}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    store = _open(args)
    if not args.output and sys.stdout.isatty():
        raise UsageError("save: refusing to write an archive to a terminal; use -o FILE")
    from lamina.store.archive import SaveItem, save

    items: list[SaveItem] = []
    for name in args.images:
        image = store.resolve_image(name)
        # By name: that name goes into the archive; by ID: none (as docker does).
        refs: list[Reference] = []
        try:
            ref = Reference.parse(name)
            if ref.familiar in image.tags:
                refs = [ref]
        except UsageError:
            pass
        items.append(SaveItem(image, refs))
    # On stderr, as standard output may be the archive.
    progress = LayerProgress.to_stream(None if args.quiet else sys.stderr, silent_for=SILENT_FOR)
    if args.output:
        save(store, items, Path(args.output), args.format, progress)
        return 0
    # To stdout (a pipe or a file): build it in the store's tmp, then stream it.
    tmp = temp_name(store.tmp_dir, "save")
    try:
        save(store, items, tmp, args.format, progress)
        with open(tmp, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer, CHUNK)
        sys.stdout.buffer.flush()
    finally:
        tmp.unlink(missing_ok=True)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from lamina.store.archive import ARCHIVE_IDENT, ARCHIVE_STEP_SILENCE, load

    store = _open(args)
    # docker's load shows a line per layer on stdout; -q only the names loaded.
    progress = LayerProgress.to_stream(None if args.quiet else sys.stdout)
    if args.input:
        loaded = load(store, Path(args.input), progress)
    elif sys.stdin.isatty():
        raise UsageError("load: no archive: use -i FILE or pipe one into stdin")
    else:
        tmp = temp_name(store.tmp_dir, "stdin")
        try:
            with open(tmp, "xb") as f:
                _copy_counting(sys.stdin.buffer, f,
                               progress.counter(ARCHIVE_IDENT, "Reading", None, silent_for=ARCHIVE_STEP_SILENCE))
            loaded = load(store, tmp, progress)
        finally:
            tmp.unlink(missing_ok=True)
    for image, tags in loaded:
        if tags:
            for tag in tags:
                print(f"Loaded image: {Reference.parse(tag).familiar}")
        else:
            print(f"Loaded image ID: sha256:{image.id}")
    return 0


def _copy_counting(source: BinaryIO, dest: BinaryIO, count: Callable[[int], None]) -> None:
    while chunk := source.read(CHUNK):
        dest.write(chunk)
        count(len(chunk))


# --- image prune --------------------------------------------------------------------------------


def prune_images(store: Store, every_unused: bool) -> tuple[list[Image], int]:
    """Delete the dangling images (with ``every_unused``: every image no container uses); the
    caller holds the store's lock. Returns them and the bytes of the layers only they used."""
    images = store.images()
    doomed = [i for i in images if not store.image_in_use(i.id)] if every_unused else store.dangling_images()
    doomed_ids = {i.id for i in doomed}
    kept_layers = {layer.diff_id for i in images if i.id not in doomed_ids for layer in i.layers}
    freed = {layer.diff_id: layer.size for i in doomed for layer in i.layers if layer.diff_id not in kept_layers}
    for image in doomed:
        for tag in image.tags:
            store.untag(tag)
        store.delete_image(image)
    return doomed, sum(freed.values())


def cmd_image_prune(args: argparse.Namespace) -> int:
    """docker's ``image prune``: "Deleted Images:" with untagged/deleted lines, then the total."""
    store = _open(args)
    with store.lock():
        doomed, freed = prune_images(store, every_unused=args.all)
    if doomed:
        print("Deleted Images:")
        for image in doomed:
            for tag in image.tags:
                print(f"untagged: {Reference.parse(tag).familiar}")
            print(f"deleted: sha256:{image.id}")
        print()
    print(f"Total reclaimed space: {human_size(freed)}")
    return 0


# --- registration --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    p = subparsers.add_parser("images", help="list images")
    p.add_argument("repository", nargs="?", help="only images of this repository[:tag]")
    p.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    p.add_argument("-a", "--all", action="store_true",
                   help="accepted for docker compatibility (lamina keeps no hidden intermediate images)")
    p.add_argument("--no-trunc", action="store_true", help="full IDs")
    p.add_argument("--digests", action="store_true", help="show each image's manifest digest")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="dangling=true|false, reference=PATTERN, label=KEY[=VALUE], before=IMAGE, "
                        "since=IMAGE (docker's images filters)")
    p.add_argument("--format", help="'json', 'table' or a template like '{{.ID}} {{.Size}}'")
    p.set_defaults(handler=cmd_images)

    p = subparsers.add_parser("tag", help="give an image another name")
    p.add_argument("source")
    p.add_argument("target", nargs="+")
    p.set_defaults(handler=cmd_tag)

    p = subparsers.add_parser("rmi", help="remove images (a tag with siblings is only untagged)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="untag an image in use instead of refusing")
    p.set_defaults(handler=cmd_rmi)

    p = subparsers.add_parser("inspect", help="low-level JSON of images (and containers)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--format", help="template like '{{.Config.Cmd}}' or '{{json .Config}}'")
    p.add_argument("--type", choices=["image", "container"], default=None)
    p.set_defaults(handler=cmd_inspect)

    p = subparsers.add_parser("history", help="the layers of an image and what made them")
    p.add_argument("image")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("--format", help="'json', 'table' or a Go template like '{{.ID}} {{.CreatedBy}}'")
    p.set_defaults(handler=cmd_history)

    p = subparsers.add_parser("import", help="make a one-layer image from a root filesystem tarball")
    p.add_argument("tarball", help="a tar (plain, gzip, zstd, xz, bzip2), or - for stdin")
    p.add_argument("reference", nargs="?", help="name[:tag] for the new image")
    p.add_argument("-c", "--change", action="append", metavar="INSTRUCTION",
                   help="apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, "
                        "LABEL, VOLUME, STOPSIGNAL); repeatable")
    p.add_argument("-m", "--message", help="commit message for the history")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    p.set_defaults(handler=cmd_import)

    p = subparsers.add_parser("save", help="write images to a docker-archive or oci-archive tar")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    p.add_argument("-o", "--output", metavar="FILE")
    p.add_argument("--format", default=ARCHIVE_FORMATS[0], choices=ARCHIVE_FORMATS)
    p.set_defaults(handler=cmd_save)

    p = subparsers.add_parser("load", help="load images from a docker-archive or oci-archive (maybe compressed)")
    p.add_argument("-i", "--input", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the names (or IDs) loaded")
    p.set_defaults(handler=cmd_load)

    p = subparsers.add_parser("image prune", help="remove dangling images (-a: every image no container uses)")
    p.add_argument("-a", "--all", action="store_true", help="every image no container uses, tagged or not")
    p.add_argument("-f", "--force", action="store_true", help="do not ask (lamina never asks)")
    p.set_defaults(handler=cmd_image_prune)
