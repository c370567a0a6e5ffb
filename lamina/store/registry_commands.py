"""The old name of :mod:`lamina.store.transfer`, kept only for ``builder/build.py``'s ``FROM`` pull.

Branch ``instr`` owns ``builder/build.py``; when its import names :mod:`lamina.store.transfer`,
this module goes.
"""

from lamina.store.transfer import Progress, api_host, default_tls_verify, pull_image

__all__ = ["Progress", "api_host", "default_tls_verify", "pull_image"]
