"""``make demo``: lamina's main job, start to finish, offline.

1. The union filesystem alone: two layers, a whiteout and a copy-up, seen through a real mount.
2. An image built from the embedded busybox base with ``lamina build``, then ``lamina run``.

Every step prints the command it runs and that command's real output, so the demo doubles as a
walk-through.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DOCKERFILE = textwrap.dedent("""\
    FROM lamina/busybox
    RUN echo "this line was written by a RUN step, in a rootless sandbox" > /etc/motd
    WORKDIR /app
    COPY hello.sh .
    ENV GREETING="Hello from a lamina container"
    CMD ["sh", "hello.sh"]
    """)

HELLO_SH = textwrap.dedent("""\
    echo "$GREETING"
    cat /etc/motd
    echo "running as uid $(id -u) in $(pwd), on $(uname -s)"
    """)


def show(argv: list[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print(f"$ {shlex.join(argv)}", flush=True)
    result = subprocess.run(argv, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    out = (result.stdout + result.stderr).rstrip()
    if out:
        print(textwrap.indent(out, "  "), flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: step failed with exit code {result.returncode}")
    return result


def lamina_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", *args]


def union_demo(work: Path) -> None:
    print("== 1. The union filesystem: two read-only layers under a writable upper ==")
    lower1, lower2 = work / "layer1", work / "layer2"
    upper, workdir, merged = work / "upper", work / "work", work / "merged"
    for d in (lower1, lower2, upper, workdir, merged):
        d.mkdir()
    (lower1 / "etc").mkdir()
    (lower1 / "etc" / "os-release").write_text("NAME=demo-base\n")
    (lower1 / "readme.txt").write_text("from layer 1\n")
    (lower1 / "old.txt").write_text("deleted by layer 2\n")
    (lower2 / "readme.txt").write_text("from layer 2 (shadows layer 1)\n")
    (lower2 / ".wh.old.txt").write_text("")  # an OCI-style whiteout: layer 2 deletes old.txt
    trace = work / "trace.log"
    server = [sys.executable, "-m", "unionfs", f"--trace={trace}",
              "-o", f"lowerdir={lower2}:{lower1},upperdir={upper},workdir={workdir}", str(merged)]
    show(server)
    try:
        show(["ls", "-la", str(merged)])
        show(["cat", str(merged / "readme.txt")])
        show(["sh", "-c", f"echo appended by the container >> {merged / 'etc' / 'os-release'}"])
        show(["cat", str(merged / "etc" / "os-release")])
        show(["rm", str(merged / "readme.txt")])
        show(["ls", "-la", str(merged)])
    finally:
        show(["fusermount3", "-u", str(merged)], check=False)
    print("What the filesystem did, from its --trace log:")
    show(["cat", str(trace)])
    print("The upper directory now holds the container layer: the copied-up file and a whiteout:")
    show(["find", str(upper), "-printf", "%y %M %p\\n"])
    print("The lower layers are untouched:")
    show(["cat", str(lower1 / "etc" / "os-release")])


def build_and_run_demo(work: Path) -> None:
    print("\n== 2. Build an image from the embedded busybox base, then run it ==")
    context = work / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "hello.sh").write_text(HELLO_SH)
    print(f"Dockerfile:\n{textwrap.indent(DOCKERFILE, '  ')}")
    show(lamina_argv("build", "-t", "lamina-demo", str(context)))
    show(lamina_argv("images"))
    show(lamina_argv("run", "--rm", "lamina-demo"))
    show(lamina_argv("history", "lamina-demo"))


def main() -> int:
    os.environ.setdefault("LAMINA_LOG_LEVEL", "warning")
    with tempfile.TemporaryDirectory(prefix="lamina-demo-") as tmp:
        work = Path(tmp)
        union_demo(work)
        build_and_run_demo(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
