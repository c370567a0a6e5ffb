"""The embedded default base image ``lamina/busybox:latest``, built locally from busybox-static.

No network and no registry: the host's statically linked ``/bin/busybox`` (Debian's busybox-static)
is copied into a fresh root with one symlink per applet, as ``busybox --list-full`` names them. The
links are made here, from the list, rather than by ``busybox --install``, which run outside a chroot
would link to the host's paths. All mtimes are set to busybox's own, and ``created`` likewise, so the
same busybox always gives the same layer digest and the same image ID.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import subprocess
from pathlib import Path

from lamina.errors import ImageNotFound, StoreError
from lamina.store import private
from lamina.store.blobs import remove_tree, temp_name
from lamina.store.reference import Reference
from lamina.store.store import Image, Store

log = logging.getLogger(__name__)

DEFAULT_BASE = "lamina/busybox:latest"
BUSYBOX = Path(os.environ.get("LAMINA_BUSYBOX", "/bin/busybox"))
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_DIRS = {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
         "tmp": 0o1777, "root": 0o700, "home": 0o755, "var": 0o755, "var/tmp": 0o1777, "dev": 0o755,
         "proc": 0o555, "sys": 0o555, "run": 0o755}


def make_busybox_root(root: Path, busybox: Path = BUSYBOX) -> float:
    """Fill the empty directory ``root`` with a busybox system; return the mtime used throughout."""
    if not busybox.is_file():
        raise StoreError(f"{busybox} not found: install Debian's busybox-static to build the default base")
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise StoreError(f"{busybox} --list-full failed: {listing.stderr.strip()}")
    mtime = int(busybox.stat().st_mtime)
    for rel in _DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for line in sorted(set(listing.stdout.split())):
        rel = line.strip().lstrip("/")
        if not rel or rel == "bin/busybox" or ".." in rel.split("/"):
            continue
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            os.symlink("/bin/busybox", link)
    (root / "etc/passwd").write_text(_PASSWD)
    (root / "etc/group").write_text(_GROUP)
    for rel in ("etc/passwd", "etc/group"):
        os.chmod(root / rel, 0o644)
    for rel, mode in _DIRS.items():
        os.chmod(root / rel, mode)
    # Fixed times everywhere, deepest first, so the layer is reproducible.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))
    return mtime


def ensure_default_base(store: Store, reference: str = DEFAULT_BASE) -> Image:
    """The image ``lamina/busybox:latest``, building it from the host's busybox if missing."""
    key = Reference.parse(reference).tagged_key
    image_id = store.tags.read().get(key)
    if image_id is not None:
        with contextlib.suppress(ImageNotFound):
            return store.load_image(image_id)
    work = temp_name(store.tmp_dir, "base")
    private.make_private_dir(work)
    try:
        mtime = make_busybox_root(work)
        # One shared lock from layer to tag: between commit_layer and create_image the new layer
        # is referenced by nothing, and a concurrent `system prune` would collect it.
        with store.lock(shared=True):
            layer = store.commit_layer(work)
            created = dt.datetime.fromtimestamp(mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            config = {
                "created": created,
                "os": "linux",
                "config": {"Env": [PATH_ENV], "Cmd": ["sh"]},
                "history": [{"created": created,
                             "created_by": f"lamina: busybox-static base from {BUSYBOX}"}],
            }
            image = store.create_image([layer], config, tags=[reference])
        log.info("built the default base %s (%s)", reference, image.short_id)
        return image
    finally:
        remove_tree(work)
