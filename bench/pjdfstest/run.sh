#!/bin/sh
# Run pjdfstest inside union mounts: the kernel's overlayfs, lamina's unionfs, fuse-overlayfs.
#
# pjdfstest's code is never part of lamina: fetch and build it yourself, outside the repository:
#
#   git clone https://github.com/pjd/pjdfstest /tmp/pjdfstest
#   apt-get install -y autoconf automake gcc make perl       # prove comes with perl
#   cd /tmp/pjdfstest && autoreconf -ifs && ./configure && make pjdfstest
#
# Usage (as root; pjdfstest switches uids itself):
#
#   bench/pjdfstest/run.sh PJDFSTEST_DIR [kernel] [lamina] [fuse-overlayfs]   (default: all three)
#
# Each candidate gets a fresh two-layer union under a temporary directory (a lower layer holding a
# directory the tests run in, so every test works in a merged directory, plus an empty upper).
# FUSE candidates are mounted with allow_other,default_permissions, as pjdfstest calls the
# filesystem under many uids. The whole run happens in a private mount namespace, so rootless
# podman processes of other users cannot copy (and pin) our mounts.
#
# Output: for every candidate, the full prove log in $OUT/CANDIDATE.log and one summary line
#   CANDIDATE files=N tests=M failed_tests=F failed_files=K
# followed by the failing test files. OUT defaults to a new temporary directory (printed).
#
# Environment: LAMINA_PYTHON (python with lamina installed; default: the repository's .venv),
# PJD_TESTS (a subdirectory or file list relative to tests/, e.g. "rename chmod/03.t"; default: all),
# PROVE_FLAGS (e.g. -v to see every assertion).
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: $0 PJDFSTEST_DIR [kernel|lamina|fuse-overlayfs ...]" >&2
    exit 2
fi
pjd=$(cd "$1" && pwd)
shift
if [ ! -x "$pjd/pjdfstest" ] || [ ! -d "$pjd/tests" ]; then
    echo "$0: $pjd is not a built pjdfstest (no pjdfstest binary or tests/)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "$0: pjdfstest must run as root" >&2
    exit 2
fi

# Re-run ourselves in a private mount namespace (once).
if [ -z "${PJD_IN_NS:-}" ]; then
    PJD_IN_NS=1 exec unshare -m --propagation private "$0" "$pjd" "$@"
fi

repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${LAMINA_PYTHON:-$repo/.venv/bin/python}
candidates=${*:-kernel lamina fuse-overlayfs}
out=${OUT:-$(mktemp -d /tmp/pjdfstest-results.XXXXXX)}
mkdir -p "$out"
echo "results in $out"

tests=""
for t in ${PJD_TESTS:-}; do tests="$tests $pjd/tests/$t"; done
[ -n "$tests" ] || tests="$pjd/tests"

run_one() {
    cand=$1
    base=$(mktemp -d /tmp/pjd-union.XXXXXX)
    chmod 755 "$base"
    mkdir -p "$base/lower/work" "$base/upper" "$base/work" "$base/mnt"
    echo "a lower file" >"$base/lower/work/lowerfile"
    chmod 777 "$base/lower/work"   # pjdfstest's unprivileged steps create in the cwd
    opts="lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work"
    case "$cand" in
    kernel) mount -t overlay overlay -o "$opts" "$base/mnt" ;;
    lamina) "$python" -m unionfs -o "$opts,allow_other,default_permissions" "$base/mnt" ;;
    fuse-overlayfs) fuse-overlayfs -o "$opts,allow_other,default_permissions" "$base/mnt" ;;
    *) echo "unknown candidate $cand" >&2; return 2 ;;
    esac
    log="$out/$cand.log"
    # prove's exit status says only pass/fail; the log carries the counts.
    (cd "$base/mnt/work" && prove -r ${PROVE_FLAGS:-} $tests) >"$log" 2>&1 || true
    cd /
    umount "$base/mnt" 2>/dev/null || fusermount3 -u "$base/mnt" 2>/dev/null || umount -l "$base/mnt"
    rm -rf "$base"
    summarize "$cand" "$log"
}

summarize() {
    # prove prints "Files=N, Tests=M, ..." and, on failure, a "Test Summary Report" whose entries
    # read "/path/tests/x/y.t (Wstat: ... Tests: 30 Failed: 2)".
    files=$(sed -n 's/^Files=\([0-9]*\), Tests=\([0-9]*\),.*/\1/p' "$2")
    ntests=$(sed -n 's/^Files=\([0-9]*\), Tests=\([0-9]*\),.*/\2/p' "$2")
    failed=$(sed -n 's/.*Failed: \([0-9]*\))$/\1/p' "$2" | awk '{s+=$1} END {print s+0}')
    # A file fails when some test failed or the script exited non-zero ("TODO passed" alone is not a
    # failure, but is listed: it means behaviour that differs from what pjdfstest expects on Linux).
    failfiles=$(grep '^/.*\.t  *(Wstat' "$2" | grep -c -e 'Failed: [1-9]' -e 'exited' || true)
    echo "$1 files=${files:-?} tests=${ntests:-?} failed_tests=$failed failed_files=$failfiles"
    grep '^/.*\.t  *(Wstat' "$2" | sed "s|$pjd/||; s|^|    |" || true
    grep -q 'TODO passed' "$2" && echo "    (TODO passed: $(grep -B1 'TODO passed' "$2" | grep '^/' | sed "s|$pjd/||; s| .*||" | tr '\n' ' '))" || true
}

for c in $candidates; do
    run_one "$c"
done
