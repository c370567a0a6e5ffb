#!/bin/bash
# Run xfstests' fsstress inside a union mount, then check the layers it left behind: after the
# unmount, the kernel's overlayfs mounted over the same lower and upper must show the same tree
# and contents the union showed just before it (bench/outside/tree_snapshot.py).
#
# Build fsstress first, outside the repository: bench/outside/build_fsx_fsstress.sh XFSTESTS_DIR.
#
# Usage (as root):  bench/outside/fsstress.sh FSSTRESS_BIN_DIR [kernel] [lamina] [fuse-overlayfs]
#
# For every candidate: a lower layer filled by fsstress itself (run directly on it, seed 1), an
# empty upper; the candidate mounts them and fsstress runs in the merged directory over the lower
# tree with FSSTRESS_PROCS processes of FSSTRESS_OPS operations each (defaults 4 x 2500), seed 2,
# so it renames, removes, truncates and writes files that start in the lower layer. fsstress's own
# failures are in its log (it reports unexpected errors but exits 0 for most, so the check that
# matters is the comparison). Then: snapshot, unmount, mount the kernel's overlayfs over the same
# layers (a fresh workdir), snapshot, diff.
#
# Output: per candidate
#   fsstress CANDIDATE procs=P ops=N entries=E differences=D exit=X (fsstress's, or 97/98: a snapshot failed)
# followed by the first differing lines (- before unmount, + the kernel's overlayfs after).
# Environment: FSSTRESS_PROCS, FSSTRESS_OPS, FSSTRESS_SEED (default 2), LAMINA_PYTHON, OUT.
set -eu
. "$(dirname "$0")/common.sh"

outside_usage "$#" 1 "FSSTRESS_BIN_DIR [kernel|lamina|fuse-overlayfs ...]"
bindir=$(cd "$1" && pwd)
shift
fsstress="$bindir/fsstress"
[ -x "$fsstress" ] || { echo "$0: no fsstress in $bindir (see build_fsx_fsstress.sh)" >&2; exit 2; }
outside_need_root fsstress.sh
outside_in_private_namespace "$bindir" "$@"

here=$(cd "$(dirname "$0")" && pwd)
outside_setup fsstress "$@"
procs=${FSSTRESS_PROCS:-4}
nops=${FSSTRESS_OPS:-2500}

for cand in $candidates; do
    base=$(mktemp -d /tmp/fsstress-union.XXXXXX)
    mkdir -p "$base/lower" "$base/upper" "$base/work" "$base/work2" "$base/mnt"
    "$fsstress" -d "$base/lower/t" -p "$procs" -n 500 -s 1 >"$out/$cand.lower.log" 2>&1
    mount_union "$cand" "$base" "$base/work"
    rc=0
    "$fsstress" -d "$base/mnt/t" -p "$procs" -n "$nops" -s "${FSSTRESS_SEED:-2}" \
        >"$out/$cand.log" 2>&1 || rc=$?
    python3 "$here/tree_snapshot.py" "$base/mnt" >"$out/$cand.before.txt" 2>"$out/$cand.snapshot.err" || rc=97
    unmount_union "$base/mnt"
    mount -t overlay overlay -o "lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work2" "$base/mnt"
    python3 "$here/tree_snapshot.py" "$base/mnt" >"$out/$cand.after.txt" 2>>"$out/$cand.snapshot.err" || rc=98
    umount "$base/mnt"
    diff -U0 "$out/$cand.before.txt" "$out/$cand.after.txt" >"$out/$cand.diff" || true
    ndiff=$(grep -c '^[-+][^-+]' "$out/$cand.diff" || true)
    echo "fsstress $cand procs=$procs ops=$((procs * nops)) entries=$(wc -l <"$out/$cand.before.txt") differences=$ndiff exit=$rc"
    grep '^[-+][^-+]' "$out/$cand.diff" | head -10 | cut -c1-200 | sed 's/^/    /'
    rm -rf "$base"
done
