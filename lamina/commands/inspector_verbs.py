"""The inspector's verbs: ``which``, ``layers``, ``mount``, ``umount`` (parsers: :mod:`.inspector`).

Handlers stay thin: they resolve names through the store, hand layer directories to
:mod:`inspector.analysis` (which/layers) or :mod:`inspector.mounts` (mount/umount), and print.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import ContainerError, ContainerNotFound, ImageNotFound, NotFoundError, UsageError
from lamina.inspector import mounts, report, waste
from lamina.inspector.analysis import (
    Event,
    LayerInput,
    PathEvent,
    PathHistory,
    StackAnalysis,
    analyze,
    instructions_for_layers,
    normalize,
)
from lamina.inspector.explorer import render_explorer
from lamina.inspector.render import human_size, percent, printable, render_svg
from lamina.layout import Layout
from unionfs.core.stack import LayerStack

# --- loading -------------------------------------------------------------------------------------


@dataclass
class LoadedImage:
    """An image's layers, plus a container's upper directory on top when a container was named."""

    reference: str
    image: Any               # store.Image
    inputs: list[LayerInput]
    container: Any = None    # runner.state.Container

    @property
    def title(self) -> str:
        if self.container is not None:
            return f"container {self.container.name} (image {self.container.image})"
        return f"{self.reference} ({self.image.id[:12]})"


def _resolve(layout: Layout, reference: str) -> tuple[Any, Any]:
    """``(image, container)`` for an image reference, or for a container (id, prefix or name).

    Error handling: :class:`NotFoundError` when neither exists; :class:`ContainerError` when the
    container's image is gone from the store.
    """
    from lamina.application import open_store

    store = open_store(layout)
    try:
        return store.resolve_image(reference), None
    except ImageNotFound:
        pass
    from runner.state import ContainerStore

    try:
        container = ContainerStore(layout).get(reference)
    except ContainerNotFound:
        raise NotFoundError(f"no image or container named {reference}") from None
    try:
        return store.resolve_image(container.image_id), container
    except ImageNotFound:
        raise ContainerError(f"container {container.name}: its image {container.image_id[:12]} "
                             f"is gone") from None


def _load_image(layout: Layout, reference: str) -> LoadedImage:
    """The layers of an image, or of a container's image plus its upper directory on top; for a
    ``HOST/REPO:TAG`` in neither the store nor the containers, the image's TOCs in its registry."""
    if _names_a_remote_image(layout, reference):
        from lamina.inspector.toc_layers import remote_layer_inputs

        remote, inputs = remote_layer_inputs(layout, reference)
        return LoadedImage(reference, remote, inputs)
    image, container = _resolve(layout, reference)
    layers = list(image.layers)
    history = image.config.get("history") or []
    instructions = instructions_for_layers(history, len(layers))
    inputs = [LayerInput(Path(layer.path), layer.diff_id, instruction)
              for layer, instruction in zip(layers, instructions, strict=True)]
    if container is not None:
        inputs.append(LayerInput(Path(container.upper), f"container:{container.id}",
                                 f"upperdir of container {container.name} (read-write)"))
    return LoadedImage(reference, image, inputs, container)


def _analyze(loaded: LoadedImage) -> StackAnalysis:
    """Analyze the layers as root of lamina's user namespace.

    Unprivileged, layer files owned by subordinate ids (a container's ``chown 1000 /data; chmod
    700 /data``, an image's ``_apt`` cache directory) are unreadable to the user but not to root
    of the namespace that maps those ids; as real root this runs in-process.
    """
    from runner.sandbox import call_in_userns

    if all(layer.scan is not None for layer in loaded.inputs):
        return analyze(loaded.inputs, False)  # from TOCs: nothing on disk to read
    if not all(Path(layer.path).is_dir() for layer in loaded.inputs):
        missing = next(layer.path for layer in loaded.inputs if not Path(layer.path).is_dir())
        raise NotFoundError(f"{loaded.reference}: layer directory missing: {missing} "
                            f"(store damaged? re-pull or rebuild the image)")
    return call_in_userns(analyze, loaded.inputs, loaded.container is not None)


def _out(line: str) -> None:
    """Print one line of a report; names from layers may hold bytes a terminal must not see raw."""
    print(printable(line))


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


# --- which ---------------------------------------------------------------------------------------


def _describe(analysis: StackAnalysis, index: int) -> str:
    layer = analysis.layers[index]
    return f"{analysis.layer_name(index)} ({_short(layer.digest)}) {layer.instruction or '(no history)'}"


def which_report(analysis: StackAnalysis, h: PathHistory) -> dict[str, Any]:
    def layer_info(index: int) -> dict[str, Any]:
        layer = analysis.layers[index]
        return {"layer": index + 1, "diff_id": layer.digest, "instruction": layer.instruction,
                **({"container": True} if layer is analysis.container_layer else {})}

    return {
        "path": h.path,
        "present": h.visible,
        "type": "directory" if h.is_dir else "file",
        "provided_by": layer_info(h.provider) if h.provider is not None else None,
        "shadows": [layer_info(i) for i in h.shadowed],
        "removed": [{**layer_info(e.layer), "how": e.event.value,
                     **({"by": e.cause} if e.cause else {})} for e in h.deleted_by],
        "history": [{**layer_info(e.layer), "event": e.event.value} for e in h.events],
    }


def cmd_which(args: argparse.Namespace) -> int:
    loaded = _load_image(args.layout, args.image)
    analysis = _analyze(loaded)
    path = normalize(args.path)
    h = analysis.history(path)
    if h is None or not h.events:
        raise NotFoundError(f"{path}: no layer of {args.image} has it")
    if args.json:
        print(json.dumps(which_report(analysis, h), indent=2))
        return 0

    if h.provider is not None:
        where = ("the container layer" if analysis.layers[h.provider] is analysis.container_layer
                 else f"layer {h.provider + 1} of {len(analysis.image_layers)}")
        _out(f"{path}: provided by {where}")
        _out(f"  digest       {analysis.layers[h.provider].digest}")
        _out(f"  instruction  {analysis.layers[h.provider].instruction or '(no history)'}")
        for copy in reversed(h.lower_copies):
            verb = "merges with" if h.is_dir and copy.is_dir else "shadows"
            _out(f"  {verb:<12} {_describe(analysis, copy.layer)}")
    else:
        what = "container" if analysis.container_layer is not None else "image"
        _out(f"{path}: not in the {what} (deleted)")
        for event in h.deleted_by[-1:]:
            _out(f"  {'removed by':<12} {_describe(analysis, event.layer)}: {_removal(analysis, event)}")
    print("  history:")
    width = max(len(e.event.value) for e in h.events)
    for event in h.events:
        layer = analysis.layers[event.layer]
        how = f"  [{_removal(analysis, event)}]" if event.cause or event.event is Event.DELETED else ""
        _out(f"    {analysis.layer_name(event.layer)} ({_short(layer.digest)})  {event.event.value:<{width}}  "
             f"{layer.instruction or '(no history)'}{how}")
    return 0


def _removal(analysis: StackAnalysis, event: PathEvent) -> str:
    if event.event is Event.DELETED:
        return "whiteout"
    layer = analysis.layers[event.layer]
    kind = ("opaque directory" if event.cause in layer.opaque_dirs else
            "whiteout" if event.cause in layer.whiteouts else "replaced by a non-directory")
    return f"hidden by {event.cause} ({kind})"


# --- layers --------------------------------------------------------------------------------------


def layers_table(analysis: StackAnalysis) -> list[str]:
    rows = [("#", "DIFF ID", "SIZE", "ADDED", "CHANGED", "DELETED", "WASTED", "INSTRUCTION")]
    for layer in reversed(analysis.layers):
        number = "C" if layer is analysis.container_layer else str(layer.index + 1)
        rows.append((number, _short(layer.digest), human_size(layer.size), str(layer.added),
                     str(layer.changed), str(layer.deleted), human_size(layer.wasted),
                     layer.instruction or "(no history)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if 2 <= i <= 6 else cell.ljust(w)   # numbers right-aligned
                 for i, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))]
        lines.append("  ".join(cells) + "  " + row[-1])
    lines.append(f"efficiency {percent(analysis.efficiency)}: {human_size(analysis.wasted_bytes)} of "
                 f"{human_size(analysis.total_bytes)} in layers is hidden by later layers")
    return lines


def _write_output(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e


def cmd_layers(args: argparse.Namespace) -> int:
    limits = report.parse_thresholds(args.fail_on_waste, args.fail_on_efficiency)
    if (args.layer is not None or args.changes_only) and not args.tree:
        raise UsageError("--layer and --changes-only go with --tree")
    if args.explore and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("--explore needs a terminal")
    loaded = _load_image(args.layout, args.image)
    analysis = _analyze(loaded)
    if args.explore:
        from lamina.inspector import terminal

        terminal.run(analysis, loaded.title)
        return 0
    if args.html:
        _write_output(args.html, render_explorer(analysis, loaded.title))
    if args.svg:
        _write_output(args.svg, render_svg(analysis, loaded.title))
    score = waste.dive_score(analysis)
    if args.tree or args.wasted:
        for line in report.trees_and_waste(analysis, tree=args.tree, layer=args.layer,
                                           changes_only=args.changes_only, wasted=args.wasted, as_json=args.json):
            _out(line)
    elif args.json:
        print(json.dumps({
            "image": loaded.image.id,
            "container": loaded.container.id if loaded.container is not None else None,
            "layers": [{"layer": layer.index + 1, "container": layer is analysis.container_layer, "diff_id": layer.digest, "instruction": layer.instruction,
                        "size": layer.size, "added": layer.added, "changed": layer.changed,
                        "deleted": layer.deleted, "wasted": layer.wasted, "whiteouts": layer.whiteouts,
                        "opaque_dirs": layer.opaque_dirs} for layer in analysis.layers],
            "total_bytes": analysis.total_bytes,
            "wasted_bytes": analysis.wasted_bytes,
            "efficiency": analysis.efficiency,
            "dive": report.dive_data(score),
        }, indent=2))
    else:
        for line in layers_table(analysis):
            _out(line)
        _out(report.dive_summary(score))
    report.enforce(score, limits)
    return 0


# --- mount / umount ------------------------------------------------------------------------------


def _select_upto(layers: list[Any], upto: str) -> int:
    """How many bottom layers ``--upto`` keeps: a layer number 1..N or a unique digest prefix."""
    if upto.isdigit():
        n = int(upto)
        if not 1 <= n <= len(layers):
            raise UsageError(f"--upto {upto}: the image has layers 1..{len(layers)}")
        return n
    prefix = upto.removeprefix("sha256:").lower()
    if len(prefix) < 4:
        raise UsageError(f"--upto {upto}: give a layer number or at least 4 digits of a digest")
    matches = {i for i, layer in enumerate(layers)
               for digest in (layer.diff_id, getattr(layer, "digest", "") or "")
               if digest.removeprefix("sha256:").startswith(prefix)}
    if not matches:
        raise UsageError(f"--upto {upto}: no layer of the image has that digest")
    if len(matches) > 1:
        raise UsageError(f"--upto {upto}: ambiguous, layers {', '.join(str(i + 1) for i in sorted(matches))}")
    return matches.pop() + 1


def _mount_request(args: argparse.Namespace) -> mounts.StackRequest:
    image, container = _resolve(args.layout, args.target)
    if container is not None:
        return _container_request(args, image, container)
    layers = list(image.layers)
    keep = _select_upto(layers, args.upto) if args.upto else len(layers)
    lowers = LayerStack.from_bottom_up(layer.path for layer in layers[:keep])
    return mounts.StackRequest(lowers=lowers, upper=None, work=None, source=args.target, image_id=image.id,
                               container_id=None, layers=keep, scratch_rw=args.rw)


def _container_request(args: argparse.Namespace, image: Any, container: Any) -> mounts.StackRequest:
    """A container's root: its upper directory over its image's layers (over its init layer)."""
    if args.upto:
        raise UsageError("--upto applies to images; mount the container's image to see its layers")
    upper, work = Path(container.upper), Path(container.work)
    if not upper.is_dir():
        raise ContainerError(f"container {container.name} has no upper directory: {upper}")
    lowers = LayerStack.from_bottom_up(layer.path for layer in image.layers)
    init = Path(container.directory) / "init"
    if init.is_dir():
        lowers = lowers.with_bottom(init)   # the runner's bottom layer of mount points, as the container sees it
    if args.rw:
        if container.running:
            raise ContainerError(f"container {container.name} is running; mount it without --rw "
                                 f"(two writers on one upper directory corrupt it)")
        work.mkdir(exist_ok=True)
        return mounts.StackRequest(lowers=lowers, upper=upper, work=work, source=args.target,
                                   image_id=image.id, container_id=container.id, layers=len(image.layers))
    # Read-only view: the container layer becomes the topmost lowerdir.
    return mounts.StackRequest(lowers=lowers.with_top(upper), upper=None, work=None, source=args.target,
                               image_id=image.id, container_id=container.id, layers=len(image.layers))


def cmd_mount(args: argparse.Namespace) -> int:
    if args.target is None:
        if args.rw or args.upto or args.directory or args.trace or args.allow_other:
            raise UsageError("mount: --rw, --upto, --trace, --allow-other and DIR need an IMAGE or CONTAINER")
        _list_mounts(args.layout)
        return 0
    if _names_a_remote_image(args.layout, args.target):
        return _mount_lazy(args)
    from lamina.lazy import prefork

    prefork.discard()  # a layer server started on a guess: not wanted (a forked server would keep it waiting)
    request = _mount_request(args)
    request.trace = args.trace.absolute() if args.trace else None
    request.allow_other = args.allow_other
    state = mounts.mount_image_stack(args.layout, request, args.directory)
    print(state.mountpoint)
    return 0


def _names_a_remote_image(layout: Layout, target: str) -> bool:
    """A ``HOST/REPO[:TAG]`` that is neither an image in the store nor a container."""
    from lamina.lazy.mount import is_registry_reference

    if not is_registry_reference(target):
        return False
    try:
        _resolve(layout, target)
    except NotFoundError:
        return True
    return False


def _mount_lazy(args: argparse.Namespace) -> int:
    """Mount an image from its registry without pulling it (see :mod:`lamina.lazy.mount`)."""
    from lamina.lazy.mount import mount_lazy

    if args.rw:
        raise UsageError("mount: --rw is not supported for an image mounted from a registry")
    if args.upto and not args.upto.isdigit():
        raise UsageError(f"--upto {args.upto}: give a layer number for an image mounted from a registry")
    state = mount_lazy(args.layout, args.target, args.directory, upto=int(args.upto) if args.upto else None,
                       trace=args.trace, allow_other=args.allow_other)
    print(state.mountpoint)
    return 0


def _list_mounts(layout: Layout) -> None:
    records = mounts.list_mounts(layout)
    if not records:
        return
    live = mounts.fuse_mountpoints()
    rows = [("MOUNT ID", "SOURCE", "LAYERS", "MODE", "PID", "MOUNTPOINT")]
    for _, state in records:
        mode = "rw" if state.writable else "ro"
        rows.append((state.id, state.source, str(state.layers), mode if state.mountpoint in live else "stale",
                     str(state.pid), state.mountpoint))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        _out("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])


def cmd_umount(args: argparse.Namespace) -> int:
    mounts.unmount(args.layout, args.directory, lazy=args.lazy)
    return 0
