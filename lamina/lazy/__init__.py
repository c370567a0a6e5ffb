"""Lazy images: an image in a registry mounted without pulling it (eStargz layers read on demand)."""
