#!/bin/bash
# How often `umount M && umount LOWERFS` fails with EBUSY: the union's server still holds the
# lower filesystem when umount(8) of the union has returned. Root only.
#
# Usage: bench/umount_lower.sh [CYCLES]   (default 30)
# Each cycle mounts a fresh tmpfs L holding lower, upper and work, mounts a union of them on M,
# lists, reads and appends through it, then runs `umount M && umount L` in one shell. The
# candidates take turns within every cycle (interleaved, so load hits them alike):
#   kernel          the kernel's overlayfs
#   lamina          lamina-unionfs from this checkout (LAMINA_PYTHON, default .venv/bin/python)
#   lamina-ref      the same from another source tree, when LAMINA_REF_PYTHONPATH names one
#                   (e.g. `git archive main unionfs | tar -x -C /tmp/ref`: an A/B against main)
#   fuse-overlayfs  when installed
# The whole run happens in a private mount namespace of its own; it prints one line of counts.
set -eu

if [ "${UMOUNT_LOWER_INNER:-}" != 1 ]; then
    exec env UMOUNT_LOWER_INNER=1 unshare -m --propagation private "$0" "$@"
fi

cycles=${1:-30}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${LAMINA_PYTHON:-$repo/.venv/bin/python}
candidates="kernel lamina"
[ -n "${LAMINA_REF_PYTHONPATH:-}" ] && candidates="$candidates lamina-ref"
command -v fuse-overlayfs >/dev/null && candidates="$candidates fuse-overlayfs"

base=$(mktemp -d /tmp/umount-lower.XXXXXX)
trap 'umount -l "$base/M" 2>/dev/null || true; umount -l "$base/L" 2>/dev/null || true; rm -rf "$base"' EXIT
L=$base/L M=$base/M
mkdir -p "$L" "$M"
declare -A busy
for c in $candidates; do busy[$c]=0; done

for ((i = 0; i < cycles; i++)); do
    for c in $candidates; do
        mount -t tmpfs -o size=8m tmpfs "$L"
        mkdir -p "$L/lower/d" "$L/upper" "$L/work"
        for n in a b c; do echo orig >"$L/lower/d/$n"; done
        opts="lowerdir=$L/lower,upperdir=$L/upper,workdir=$L/work"
        case $c in
            kernel) mount -t overlay overlay -o "$opts" "$M" ;;
            lamina) (cd "$repo" && "$python" -m unionfs -o "$opts" "$M") ;;
            lamina-ref) (cd / && PYTHONPATH=$LAMINA_REF_PYTHONPATH "$python" -m unionfs -o "$opts" "$M") ;;
            fuse-overlayfs) fuse-overlayfs -o "$opts" "$M" 2>/dev/null ;;
        esac
        if ! { ls "$M/d" >/dev/null && cat "$M/d/a" >/dev/null && echo more >>"$M/d/b"; }; then
            echo "$c, cycle $i: using the union failed" >&2
        fi
        if ! { umount "$M" && umount "$L" 2>/dev/null; }; then
            busy[$c]=$((busy[$c] + 1))
            umount "$M" 2>/dev/null || true
            for _ in $(seq 50); do umount "$L" 2>/dev/null && break; sleep 0.1; done
        fi
    done
done

line="umount M && umount L, $cycles cycles, EBUSY:"
for c in $candidates; do line="$line $c=${busy[$c]}"; done
echo "$line"
