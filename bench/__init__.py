"""lamina's benchmarks: lamina against the kernel's overlayfs, fuse-overlayfs and podman.

``python -m bench`` (``make bench``) runs them all and writes ``bench/results/<stamp>.json`` and
``.md``; ``python -m bench --quick`` runs each at a tiny size (CI). See BENCHMARKS.md.
"""
