#!/bin/sh
# Run unionmount-testsuite (github amir73il/unionmount-testsuite) against union mounts: the kernel's
# overlayfs, lamina's unionfs and fuse-overlayfs, side by side.
#
# The suite is never part of lamina: fetch it yourself, outside the repository (it needs no build):
#
#   git clone https://github.com/amir73il/unionmount-testsuite /work/ext-suites/unionmount-testsuite
#
# Usage (as root; the suite mounts and unmounts itself):
#
#   bench/outside/unionmount.sh [--xdev] SUITE_DIR [kernel] [lamina] [fuse-overlayfs]  (default: all)
#
# Every test runs on its own (the suite stops at its first failure): `./run --ov [--fuse=TYPE]
# [--xdev] TEST`. Without --xdev the 58 tests include the four directory-rename tests (the union
# renames directories, as redirect_dir=on does); with --xdev those four are replaced by
# rename-exdev, which expects EXDEV from renaming a lower directory: the kernel's overlayfs with
# redirect_dir off gives EXDEV, while lamina (and fuse-overlayfs) rename the directory, so lamina
# fails rename-exdev by design (docs/outside-suites.md).
#
# FUSE candidates are mounted by mount(8) as `mount -t fuse.PROGRAM`, through mount.fuse3, the way
# /etc/fstab would: for lamina PROGRAM is lamina-unionfs, a wrapper around $LAMINA_PYTHON -m unionfs
# that this script puts first on mount(8)'s helper path (/usr/local/sbin, bind-mounted in a private
# mount namespace). The layers are tmpfs mounts under a temporary directory, so nothing outside it
# is touched.
#
# Output: for every candidate, the log of each test in $OUT/CANDIDATE/TEST.log, and one line
#   unionmount CANDIDATE[+xdev] tests=N passed=P failed=F
# followed by the failing tests and the last line of their logs.
# Environment: LAMINA_PYTHON (default: the repository's .venv), OUT (default: a new temporary dir),
# UNIONMOUNT_TESTS (a space-separated list of tests; default: all the suite runs), UNIONMOUNT_LAYERS
# (N: rotate the upper into up to N lower layers during the tests, `--ov=N`).
set -eu
. "$(dirname "$0")/common.sh"

xdev=""
if [ "${1:-}" = "--xdev" ]; then
    xdev="--xdev"
    shift
fi
outside_usage "$#" 1 "[--xdev] SUITE_DIR [kernel|lamina|fuse-overlayfs ...]"
suite=$(cd "$1" && pwd)
shift
if [ ! -x "$suite/run" ] || [ ! -d "$suite/tests" ]; then
    echo "$0: $suite is not unionmount-testsuite (no run script or tests/)" >&2
    exit 2
fi
outside_need_root unionmount-testsuite
# shellcheck disable=SC2086
outside_in_private_namespace $xdev "$suite" "$@"

outside_setup unionmount "$@"

scratch=$(mktemp -d /tmp/unionmount-run.XXXXXX)
chmod 755 "$scratch"   # impermissible opens files as the user bin
mkdir -p "$scratch/bin" "$scratch/base" "$scratch/lower" "$scratch/mnt"
printf '#!/bin/sh\nexec "%s" -m unionfs "$@"\n' "$python" >"$scratch/bin/lamina-unionfs"
chmod 755 "$scratch/bin/lamina-unionfs"
mount --bind "$scratch/bin" /usr/local/sbin
mount -t tmpfs unionmount_base "$scratch/base"
mount -t tmpfs unionmount_lower "$scratch/lower"
export UNIONMOUNT_BASEDIR="$scratch/base" UNIONMOUNT_LOWERDIR="$scratch/lower" UNIONMOUNT_MNTPOINT="$scratch/mnt"

# The suite's own list: the 54 common tests, then the directory-rename ones or rename-exdev.
all_tests=$(cd "$suite" && python3 - "$xdev" <<'PY'
import re, sys
src = open("run").read()
common = re.search(r"^tests = \[(.*?)\]", src, re.S | re.M).group(1)
names = re.findall(r'"([^"]+)"', common)
alt = re.findall(r"tests \+= \[(.*?)\]", src, re.S)
names += re.findall(r'"([^"]+)"', alt[0] if sys.argv[1] else alt[1])
print(" ".join(names))
PY
)
tests=${UNIONMOUNT_TESTS:-$all_tests}
# UNIONMOUNT_LAYERS=N runs every test also with up to N layers: the suite remounts during a test
# and rotates the upper layer into the lower stack (`./run --ov=N`).
ov="--ov${UNIONMOUNT_LAYERS:+=$UNIONMOUNT_LAYERS}"

cleanup() {
    (cd "$suite" && ./run -c >/dev/null 2>&1) || true
    umount "$scratch/mnt" 2>/dev/null || true
    umount "$scratch/base" "$scratch/lower" /usr/local/sbin 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

for cand in $candidates; do
    case "$cand" in
    kernel) how="$ov"; opts="" ;;
    # fuse-overlayfs adds allow_other,default_permissions by itself when run as root; lamina
    # needs them asked for (impermissible opens the files as the user bin).
    lamina) how="$ov --fuse=lamina-unionfs"; opts="allow_other,default_permissions" ;;
    fuse-overlayfs) how="$ov --fuse=fuse-overlayfs"; opts="" ;;
    *) echo "unknown candidate $cand" >&2; exit 2 ;;
    esac
    mkdir -p "$out/$cand"
    n=0; passed=0; failed=""
    for t in $tests; do
        n=$((n + 1))
        # shellcheck disable=SC2086
        if (cd "$suite" && UNIONMOUNT_MNTOPTIONS=$opts timeout 600 ./run $how $xdev "$t") >"$out/$cand/$t.log" 2>&1; then
            passed=$((passed + 1))
        else
            failed="$failed $t"
        fi
        (cd "$suite" && ./run -c) >/dev/null 2>&1 || true
    done
    echo "unionmount $cand${xdev:++xdev} tests=$n passed=$passed failed=$((n - passed))"
    for t in $failed; do
        echo "    $t: $(grep -v '^$' "$out/$cand/$t.log" | tail -1)"
    done
done
