"""The two examples of the article the project started from, for real (opt-in: LAMINA_NETWORK_TESTS=1).

A Debian base is made with ``debootstrap --variant=minbase bookworm`` (kept between runs under
``$LAMINA_TEST_CACHE``, default ``/var/tmp/lamina-test-cache``, as a tarball) and imported with
``lamina import``, then, as an unprivileged user (with and without subordinate ids):

1. ``RUN apt-get update && apt-get install -y python3``, ``WORKDIR /app``, ``COPY hello.py .``,
   ``CMD ["python3", "hello.py"]``: ``lamina run`` prints ``Hello, world!``.
2. Python with ``pip install flask`` (the host's CA bundle copied in and passed with ``--cert``, as a
   user behind a TLS-intercepting proxy must), ``COPY app.py .``, ``EXPOSE 5000``: ``lamina run -p
   5000:5000`` serves ``Hello, Flask!`` on the host's port 5000.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from harness import UnprivilegedUser

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.unprivileged, pytest.mark.fuse]

CACHE = Path(os.environ.get("LAMINA_TEST_CACHE", "/var/tmp/lamina-test-cache"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

HELLO_PY = 'print("Hello, world!")\n'
APP_PY = '''\
from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello, Flask!"


if __name__ == "__main__":
    app.run(host="0.0.0.0")
'''

# No python:latest image here: the "python" base is Debian's python3 and pip (PEP 668 asks for
# --break-system-packages to install into the system Python of a container image).
FLASK_DOCKERFILE = (
    "FROM debian:bookworm\n"
    "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip\n"
    "COPY host-ca.crt /usr/local/share/host-ca.crt\n"
    "RUN pip install --break-system-packages --cert /usr/local/share/host-ca.crt flask\n"
    "WORKDIR /app\n"
    "COPY app.py .\n"
    "EXPOSE 5000\n"
    'CMD ["python3", "app.py"]\n')


@pytest.fixture(scope="session")
def debian_tarball() -> Path:
    """A minbase bookworm root as a tarball, made once and kept in the cache directory."""
    tarball = CACHE / "debian-bookworm-minbase.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is not installed (make install adds it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "debootstrap-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                    "http://deb.debian.org/debian"], check=True, capture_output=True, timeout=1800)
    partial = tarball.with_suffix(".partial")
    # Device nodes are the runtime's business (docker's base images ship an empty /dev).
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "--exclude=./dev/?*", "-cf", str(partial), "."],
                   check=True)
    partial.rename(tarball)
    shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def _import_base(user: UnprivilegedUser, tarball: Path) -> None:
    shared = user.workdir / "debian.tar"
    shutil.copyfile(tarball, shared)
    user.chown_tree(shared)
    result = user.lamina("import", str(shared), "debian:bookworm", timeout=600)
    assert result.returncode == 0, result.stderr
    shared.unlink()


def _build(user: UnprivilegedUser, context: Path, tag: str) -> None:
    user.chown_tree(context)
    result = user.lamina("build", "-t", tag, str(context), timeout=1800)
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"


def test_article_example_python_hello(unpriv: UnprivilegedUser, debian_tarball: Path) -> None:
    _import_base(unpriv, debian_tarball)
    ctx = unpriv.workdir / "hello"
    ctx.mkdir()
    (ctx / "hello.py").write_text(HELLO_PY)
    (ctx / "Dockerfile").write_text(
        "FROM debian:bookworm\n"
        "RUN apt-get update && apt-get install -y python3\n"
        "WORKDIR /app\n"
        "COPY hello.py .\n"
        'CMD ["python3", "hello.py"]\n')
    _build(unpriv, ctx, "my-python-image")
    run = unpriv.lamina("run", "--rm", "my-python-image", timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "Hello, world!\n"


def _free_port(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_article_example_flask(unpriv: UnprivilegedUser, debian_tarball: Path) -> None:
    if not _free_port(5000):
        pytest.fail("port 5000 is busy on this host; the article's example publishes 5000:5000")
    _import_base(unpriv, debian_tarball)
    ctx = unpriv.workdir / "flask"
    ctx.mkdir()
    (ctx / "app.py").write_text(APP_PY)
    shutil.copyfile(HOST_CA, ctx / "host-ca.crt")
    (ctx / "Dockerfile").write_text(FLASK_DOCKERFILE)
    _build(unpriv, ctx, "my-flask-image")
    run = unpriv.lamina("run", "-d", "--name", "flask-test", "-p", "5000:5000", "my-flask-image", timeout=120)
    assert run.returncode == 0, run.stderr
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:5000/", timeout=5) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body == "Hello, Flask!", unpriv.lamina("logs", "flask-test").stdout
    finally:
        unpriv.lamina("rm", "-f", "flask-test", timeout=60)
