#!/bin/bash
# Run xfstests' fsx (file operations checked against a model of the file's contents) inside union
# mounts: the kernel's overlayfs, lamina's unionfs and fuse-overlayfs, side by side.
#
# Build fsx first, outside the repository: bench/outside/build_fsx_fsstress.sh XFSTESTS_DIR.
#
# Usage (as root):  bench/outside/fsx.sh FSX_BIN_DIR [kernel] [lamina] [fuse-overlayfs]
#
# FSX_BIN_DIR holds the built fsx. Each candidate gets a fresh union over the same kind of layers
# (a lower layer holding one file per seed, written there by a short fsx run, an empty upper). For
# every seed,
# fsx runs
#   - on a lower file, kept (-k: the file is copied up by fsx's first write and its lower contents
#     are the model's start), and on a new file, with everything this fsx offers: read/write,
#     mapped reads and writes, truncate, fallocate (allocate, keep size, punch hole, zero range,
#     collapse and insert range), copy_file_range (clone and dedupe where the upper supports them);
#   - with O_DIRECT (-Z, block-aligned, no mapped I/O) on a new file, once per candidate.
# fsx itself turns off an operation the filesystem refuses at start ("disabling"); those are listed,
# and an operation the kernel's overlayfs supports but a FUSE candidate disables counts as a failure
# of that candidate (missing=...), except collapse and insert range, which the kernel's FUSE module
# refuses before any FUSE filesystem is asked. That comparison needs the kernel run first (the
# default order); without it, missing= is not computed.
#
# Output: logs in $OUT/CANDIDATE/, and per candidate
#   fsx CANDIDATE runs=R passed=P failed=F ops=N disabled=OPS [missing=OPS]
# Environment: FSX_OPS (operations per run, default 100000), FSX_SEEDS (default "1 2 3"),
# LAMINA_PYTHON, OUT, FSX_DIRECT (0 skips the O_DIRECT run).
set -eu
. "$(dirname "$0")/common.sh"

outside_usage "$#" 1 "FSX_BIN_DIR [kernel|lamina|fuse-overlayfs ...]"
bindir=$(cd "$1" && pwd)
shift
fsx="$bindir/fsx"
[ -x "$fsx" ] || { echo "$0: no fsx in $bindir (see build_fsx_fsstress.sh)" >&2; exit 2; }
outside_need_root fsx.sh
outside_in_private_namespace "$bindir" "$@"

outside_setup fsx "$@"
ops=${FSX_OPS:-100000}
seeds=${FSX_SEEDS:-1 2 3}

disabled_ops() {  # LOG...: the operations fsx turned off ("does not support X, disabling!")
    sed -n 's/.*does not support \(fallocate mode \)\{0,1\}\(.*\), disabling.*/\2/p' "$@" 2>/dev/null \
        | tr ' |' '_+' | sort -u | tr '\n' ' '
}

kernel_disabled=""
kernel_ran=""
for cand in $candidates; do
    base=$(mktemp -d /tmp/fsx-union.XXXXXX)
    mkdir -p "$base/lower" "$base/upper" "$base/work" "$base/mnt" "$out/$cand"
    for seed in $seeds; do
        # The lower file is written by fsx itself, on the lower directory (not the union): with
        # random bytes there, fsx -k reports bad data even on plain ext4 (seeds 1-3).
        "$fsx" -q -N 200 -S "$((seed + 100))" -P "$base" "$base/lower/lower$seed" >/dev/null 2>&1
        rm -f "$base"/lower/lower"$seed".fsx*
    done
    mount_union "$cand" "$base"
    runs=0; passed=0; failed=""
    run_fsx() {  # NAME ARGS...
        local name=$1
        shift
        runs=$((runs + 1))
        if (cd "$base/mnt" && "$fsx" -P "$out/$cand" "$@") >"$out/$cand/$name.log" 2>&1; then
            passed=$((passed + 1))
        else
            failed="$failed $name"
        fi
    }
    for seed in $seeds; do
        run_fsx "lower$seed" -N "$ops" -S "$seed" -k "lower$seed"
        run_fsx "new$seed" -N "$ops" -S "$seed" "new$seed"
    done
    if [ "${FSX_DIRECT:-1}" != 0 ]; then
        first=${seeds%% *}
        run_fsx "direct$first" -N "$ops" -S "$first" -Z -R -W -r 4096 -w 4096 -t 4096 "direct$first"
    fi
    cd /
    unmount_union "$base/mnt"
    rm -rf "$base"
    dis=$(disabled_ops "$out/$cand"/*.log)
    if [ "$cand" = kernel ]; then
        kernel_ran=1
        kernel_disabled=$dis
    fi
    missing=""
    if [ "$cand" != kernel ] && [ -n "$kernel_ran" ]; then
        for op in $dis; do
            case " $kernel_disabled " in *" $op "*) continue ;; esac
            # The kernel's FUSE module itself refuses these two modes (fuse_file_fallocate).
            case "$op" in FALLOC_FL_COLLAPSE_RANGE|FALLOC_FL_INSERT_RANGE) continue ;; esac
            missing="$missing $op"
        done
    fi
    fails=$((runs - passed))
    [ -n "$missing" ] && fails=$((fails + 1))
    echo "fsx $cand runs=$runs passed=$passed failed=$fails ops=$ops disabled=${dis:-none}${missing:+ missing=${missing# }}"
    for f in $failed; do
        echo "    $f: $(grep -v '^$' "$out/$cand/$f.log" | grep -m1 -i 'fail\|error\|bad\|mismatch' | cut -c1-160)"
    done
done
