"""The filesystem suite's synthetic image: three lower layers in the overlayfs on-disk format.

Every union under test mounts the same three directories (top-most first: ``layer3``, ``layer2``,
``layer1``), so each answers the same questions:

- ``layer1``: a deep tree of small files (``tree/``, 600 directories, depth up to 10), a directory
  that becomes opaque (``opq/``), one that grows into a 10,000-entry merged directory
  (``bigdir/``) and one that is renamed (``mvdir/``);
- ``layer2``: replaces and whites out files of the tree, adds some, whites out and adds in
  ``bigdir/``, and makes ``opq/`` opaque (whiteout = character device 0:0, opaque =
  ``trusted.overlay.opaque=y``: needs root);
- ``layer3``: two large files of random data (``big/A.bin``, ``big/B.bin``).

The expected answers (file and entry counts, sizes) come from the model kept while writing the
layers, not from any of the systems measured, so a union that shows a deleted file is caught.
The image is kept under its root with a manifest of its parameters and reused when they match.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import shutil
import stat
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = 1 << 20
IMAGE_VERSION = 1
LAYERS_TOP_FIRST = ("layer3", "layer2", "layer1")


@dataclass(frozen=True)
class ImageParams:
    """Counts and sizes of the image and of the workloads' file sets (scale 1.0)."""

    seed: int = 20261207
    tree_dirs: int = 600
    tree_files: int = 9100
    tree_max_depth: int = 10
    opq_files: int = 200
    opq_new: int = 20
    bigdir_files: int = 9700
    bigdir_add: int = 500
    bigdir_delete: int = 200
    mvdir_files: int = 1000
    modify: int = 1000
    delete_in_layer2: int = 500
    add_in_layer2: int = 500
    big_mib: int = 512
    small_min: int = 1024
    small_max: int = 8192
    tar_files: int = 5000
    tar_dirs: int = 50
    create_n: int = 2000
    copyup_n: int = 2000
    delete_n: int = 2000
    stat_n: int = 5000
    rand_n: int = 5000

    @classmethod
    def scaled(cls, scale: float) -> ImageParams:
        """Every count and size times ``scale`` (at least 1; the large files at least 4 MiB)."""
        fixed = {"seed", "tree_max_depth", "small_min", "small_max"}
        values: dict[str, int] = {}
        for item in dataclasses.fields(cls):
            default = item.default
            assert isinstance(default, int)
            if item.name in fixed:
                values[item.name] = default
            else:
                values[item.name] = max(4 if item.name == "big_mib" else 1, round(default * scale))
        return cls(**values)


@dataclass
class Manifest:
    """What the workloads need to know about a built image, and the answers they must see."""

    root: str
    params: dict[str, int]
    expected_files: int
    expected_entries: int
    bigdir_entries: int
    big_size: int
    tree_files: int
    mvdir_files: int
    tar_files: int
    tar_last: str
    copyup: list[str] = field(default_factory=list)
    copyup_sizes: list[int] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    stat_paths: list[str] = field(default_factory=list)
    version: int = IMAGE_VERSION

    @property
    def image_dir(self) -> Path:
        return Path(self.root)

    @property
    def tarball(self) -> Path:
        return self.image_dir / "small.tar"

    def lowers(self) -> list[Path]:
        """The layer directories, top-most first (overlayfs's ``lowerdir`` order)."""
        return [self.image_dir / name for name in LAYERS_TOP_FIRST]

    def summary(self) -> dict[str, Any]:
        """The manifest without its long path lists (for the result file)."""
        short = dataclasses.asdict(self)
        for name in ("copyup", "copyup_sizes", "delete", "stat_paths"):
            short.pop(name)
        return short


def open_image(image_dir: Path, params: ImageParams) -> Manifest:
    """The image under ``image_dir`` built with ``params``: reused if complete, else built anew."""
    manifest_path = image_dir / "manifest.json"
    if manifest_path.exists():
        try:
            cached = Manifest(**json.loads(manifest_path.read_text()))
        except (ValueError, TypeError):
            cached = None
        if cached and cached.version == IMAGE_VERSION and cached.params == dataclasses.asdict(params) \
                and cached.root == str(image_dir):
            log.info("reusing the image in %s", image_dir)
            return cached
    shutil.rmtree(image_dir, ignore_errors=True)
    started = time.perf_counter()
    manifest = _ImageWriter(image_dir, params).write()
    manifest_path.write_text(json.dumps(dataclasses.asdict(manifest)))  # written last: marks it complete
    os.sync()
    log.info("built the image in %s in %.1f s: %d files, %d entries", image_dir,
             time.perf_counter() - started, manifest.expected_files, manifest.expected_entries)
    return manifest


class _ImageWriter:
    """Writes the layers and keeps the model of the merged view (path -> size of each visible file)."""

    def __init__(self, image_dir: Path, params: ImageParams) -> None:
        self.dir = image_dir
        self.p = params
        self.rng = random.Random(params.seed)
        self.pool = self.rng.randbytes(4 * MIB)
        self.visible: dict[str, int] = {}
        self.visible_dirs: set[str] = set()

    def content(self) -> bytes:
        size = self.rng.randint(self.p.small_min, self.p.small_max)
        offset = self.rng.randrange(0, len(self.pool) - size)
        return self.pool[offset:offset + size]

    def put(self, layer: str, rel: str, data: bytes) -> None:
        path = self.dir / layer / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.visible[rel] = len(data)

    def whiteout(self, rel: str) -> None:
        path = self.dir / "layer2" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        del self.visible[rel]

    def write(self) -> Manifest:
        for layer in LAYERS_TOP_FIRST:
            (self.dir / layer).mkdir(parents=True)
        tree_files, groups = self._layer1()
        self._layer2(tree_files, groups)
        big_size = self._layer3()
        tar_last = self._tarball()
        visible_tree = sorted(p for p in self.visible if p.startswith("tree/"))
        copyup = sorted(self.rng.sample(visible_tree, min(self.p.copyup_n, len(visible_tree) // 2)))
        chosen = set(copyup)
        delete = sorted(self.rng.sample([p for p in visible_tree if p not in chosen],
                                        min(self.p.delete_n, len(visible_tree) - len(copyup))))
        stat_paths = sorted(self.rng.sample(sorted(self.visible), min(self.p.stat_n, len(self.visible))))
        return Manifest(root=str(self.dir), params=dataclasses.asdict(self.p),
                        expected_files=len(self.visible),
                        expected_entries=len(self.visible) + len(self.visible_dirs),
                        bigdir_entries=sum(1 for p in self.visible if p.startswith("bigdir/")),
                        big_size=big_size, tree_files=len(visible_tree),
                        mvdir_files=self.p.mvdir_files, tar_files=self.p.tar_files, tar_last=tar_last,
                        copyup=copyup, copyup_sizes=[self.visible[p] for p in copyup], delete=delete,
                        stat_paths=stat_paths)

    def _layer1(self) -> tuple[list[str], dict[str, list[str]]]:
        dirs, depth = ["tree"], {"tree": 1}
        for i in range(self.p.tree_dirs - 1):
            # mostly below a recent directory, so the tree grows deep as well as wide
            recent = dirs[self.rng.randrange(max(0, len(dirs) - 8), len(dirs))]
            parent = recent if self.rng.random() < 0.6 else self.rng.choice(dirs)
            if depth[parent] >= self.p.tree_max_depth:
                parent = "tree"
            name = f"{parent}/d{i:04d}"
            dirs.append(name)
            depth[name] = depth[parent] + 1
        for name in dirs:
            (self.dir / "layer1" / name).mkdir(parents=True, exist_ok=True)
        self.visible_dirs.update(dirs)
        self.tree_dirs = dirs
        tree_files = []
        for j in range(self.p.tree_files):
            rel = f"{self.rng.choice(dirs)}/f{j:05d}.txt"
            self.put("layer1", rel, self.content())
            tree_files.append(rel)
        groups: dict[str, list[str]] = {}
        for group, prefix, count in (("opq", "o", self.p.opq_files), ("bigdir", "b", self.p.bigdir_files),
                                     ("mvdir", "m", self.p.mvdir_files)):
            (self.dir / "layer1" / group).mkdir()
            self.visible_dirs.add(group)
            groups[group] = [f"{group}/{prefix}{j:05d}.dat" for j in range(count)]
            for rel in groups[group]:
                self.put("layer1", rel, self.content())
        return tree_files, groups

    def _layer2(self, tree_files: list[str], groups: dict[str, list[str]]) -> None:
        modify = self.rng.sample(tree_files, min(self.p.modify, len(tree_files) // 2))
        modified = set(modify)
        unmodified = [p for p in tree_files if p not in modified]
        delete = self.rng.sample(unmodified, min(self.p.delete_in_layer2, len(unmodified) // 2))
        for rel in modify:
            self.put("layer2", rel, self.content())
        for rel in delete:
            self.whiteout(rel)
        for j in range(self.p.add_in_layer2):
            self.put("layer2", f"{self.rng.choice(self.tree_dirs)}/a{j:05d}.txt", self.content())
        for rel in self.rng.sample(groups["bigdir"], min(self.p.bigdir_delete, len(groups["bigdir"]) // 2)):
            self.whiteout(rel)
        for j in range(self.p.bigdir_add):
            self.put("layer2", f"bigdir/n{j:05d}.dat", self.content())
        opaque = self.dir / "layer2" / "opq"
        opaque.mkdir()
        os.setxattr(opaque, "trusted.overlay.opaque", b"y")
        for rel in groups["opq"]:
            del self.visible[rel]
        for j in range(self.p.opq_new):
            self.put("layer2", f"opq/n{j:05d}.dat", self.content())

    def _layer3(self) -> int:
        (self.dir / "layer3" / "big").mkdir()
        self.visible_dirs.add("big")
        size = self.p.big_mib * MIB
        for name in ("A.bin", "B.bin"):
            with open(self.dir / "layer3" / "big" / name, "wb") as f:
                for _ in range(self.p.big_mib):
                    f.write(os.urandom(MIB))
            self.visible[f"big/{name}"] = size
        return size

    def _tarball(self) -> str:
        """``small.tar`` (beside the layers, not in them): what the untar workload unpacks."""

        def entry(name: str, kind: bytes, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode, info.mtime = kind, size, mode, 1700000000
            info.uname = info.gname = "root"
            return info

        last = ""
        with tarfile.open(self.dir / "small.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(entry("untar", tarfile.DIRTYPE, mode=0o755))
            dirs = [f"untar/t{k:03d}" for k in range(self.p.tar_dirs)]
            for name in dirs:
                tar.addfile(entry(name, tarfile.DIRTYPE, mode=0o755))
            for j in range(self.p.tar_files):
                data = self.content()
                last = f"{dirs[j % len(dirs)]}/u{j:05d}.txt"
                tar.addfile(entry(last, tarfile.REGTYPE, len(data)), io.BytesIO(data))
        return last
