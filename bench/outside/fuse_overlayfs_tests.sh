#!/bin/bash
# Run fuse-overlayfs's own test scripts (github containers/fuse-overlayfs, tests/*.sh) against the
# kernel's overlayfs, lamina's unionfs and fuse-overlayfs, side by side.
#
# The scripts are never part of lamina: fetch them yourself, outside the repository (they need no
# build; fuse-overlayfs itself is the distribution's package):
#
#   git clone https://github.com/containers/fuse-overlayfs /work/ext-suites/fuse-overlayfs
#   apt-get install -y fuse-overlayfs fuse2fs e2fsprogs gcc      # test-mmap uses fuse2fs and gcc
#
# Usage (as root):
#
#   bench/outside/fuse_overlayfs_tests.sh TESTS_DIR [kernel] [lamina] [fuse-overlayfs]  (default: all)
#
# TESTS_DIR is the checkout's tests/ directory. The scripts call `fuse-overlayfs -o OPTS MNT`; for
# the other candidates a wrapper of that name comes first on PATH: for lamina it runs
# `$LAMINA_PYTHON -m unionfs -o OPTS MNT`, for the kernel `mount -t overlay overlay -o OPTS MNT`.
# Only the scripts that use no fuse-overlayfs-only option run (APPLICABLE below); the others are
# listed with the option that rules them out. Each runs in a private mount namespace, in its own
# temporary directory.
#
# Output: every script's log in $OUT/CANDIDATE/SCRIPT.log and one line per candidate
#   fuse-overlayfs-tests CANDIDATE scripts=N passed=P failed=F
# followed by the failing scripts and the command that failed (the last one their `set -x` trace
# shows before the cleanup trap).
# Environment: LAMINA_PYTHON, OUT, FOT_SCRIPTS (a subset of APPLICABLE), FOT_TIMEOUT (s, default 1800).
set -eu
. "$(dirname "$0")/common.sh"

# Scripts that use only lowerdir/upperdir/workdir and mount(8)'s own flags (dev, suid).
APPLICABLE="test-copyup.sh test-hardlinks.sh test-mmap.sh test-rename.sh test-special-files.sh
test-stress.sh test-symlinks.sh unlink.sh"
# Not run: test-dir-ops.sh (static_nlink), test-passthrough.sh (xino, inode numbers from the
# lower filesystems), test-readonly.sh (squash_to_uid, uidmapping, volatile), test-xattr.sh
# (noxattrs), unpriv.sh (xattr_permissions; runs as non-root under podman unshare).

outside_usage "$#" 1 "TESTS_DIR [kernel|lamina|fuse-overlayfs ...]"
tests_dir=$(cd "$1" && pwd)
shift
if [ ! -f "$tests_dir/test-stress.sh" ]; then
    echo "$0: $tests_dir is not fuse-overlayfs's tests/ directory (no test-stress.sh)" >&2
    exit 2
fi
outside_need_root "fuse-overlayfs's test scripts mount and"
outside_in_private_namespace "$tests_dir" "$@"

outside_setup fot "$@"
scratch=$(mktemp -d /tmp/fot-run.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

mkdir -p "$scratch/bin-lamina" "$scratch/bin-kernel"
printf '#!/bin/sh\nexec "%s" -m unionfs "$@"\n' "$python" >"$scratch/bin-lamina/fuse-overlayfs"
cat >"$scratch/bin-kernel/fuse-overlayfs" <<'SH'
#!/bin/sh
# fuse-overlayfs -o OPTS MNT, as a kernel overlayfs mount
opts=""
while [ "$#" -gt 1 ]; do
    case "$1" in
    -o) opts="${opts:+$opts,}$2"; shift 2 ;;
    -o*) opts="${opts:+$opts,}${1#-o}"; shift ;;
    *) shift ;;
    esac
done
exec mount -t overlay overlay -o "$opts" "$1"
SH
chmod 755 "$scratch/bin-lamina/fuse-overlayfs" "$scratch/bin-kernel/fuse-overlayfs"

for cand in $candidates; do
    case "$cand" in
    kernel|lamina) path="$scratch/bin-$cand:$PATH" ;;
    fuse-overlayfs) path="$PATH" ;;
    *) echo "unknown candidate $cand" >&2; exit 2 ;;
    esac
    mkdir -p "$out/$cand"
    n=0; passed=0; failed=""
    for s in ${FOT_SCRIPTS:-$APPLICABLE}; do
        n=$((n + 1))
        work=$(mktemp -d "$scratch/work.XXXXXX")
        if (cd "$work" && PATH="$path" timeout "${FOT_TIMEOUT:-1800}" bash "$tests_dir/$s") \
                >"$out/$cand/$s.log" 2>&1; then
            passed=$((passed + 1))
        else
            failed="$failed $s"
        fi
        # A script that failed half-way may leave its mounts: they live in this namespace only.
        grep -o " $scratch/[^ ]*\| /tmp/test-[^ ]*" /proc/self/mounts | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
        rm -rf "$work"
    done
    echo "fuse-overlayfs-tests $cand scripts=$n passed=$passed failed=$((n - passed))"
    for s in $failed; do
        # The command that failed: the last one traced before the exit trap's cleanup.
        last=$(grep '^+' "$out/$cand/$s.log" | sed -n '/^+ cleanup$/q; p' | tail -1)
        echo "    $s: ${last:-$(tail -1 "$out/$cand/$s.log")}" | cut -c1-200
    done
done
