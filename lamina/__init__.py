"""lamina: build and run Docker/OCI images rootless, on a userspace union filesystem."""

__version__ = "0.1.0"
