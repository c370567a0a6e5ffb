#!/bin/sh
# Build just fsx and fsstress from an xfstests checkout (github kdave/xfstests), with gcc and a
# small config.h written here instead of xfstests' autoconf run. Nothing is built in the repository:
#
#   git clone https://github.com/kdave/xfstests /work/ext-suites/xfstests
#   bench/outside/build_fsx_fsstress.sh /work/ext-suites/xfstests [OUT_DIR]
#
# OUT_DIR defaults to XFSTESTS_DIR/ltp-lamina; it gets the two binaries, fsx and fsstress. They are
# built without libaio, liburing and libbtrfsutil (their AIO, io_uring and btrfs operations are
# left out); fallocate (all modes), copy_file_range, mmap and O_DIRECT are in. Needs gcc and
# xfslibs-dev (fsstress includes <xfs/xfs.h>; its XFS ioctls fail with ENOTTY elsewhere).
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: $0 XFSTESTS_DIR [OUT_DIR]" >&2
    exit 2
fi
src=$(cd "$1" && pwd)
out=${2:-$src/ltp-lamina}
for f in ltp/fsx.c ltp/fsstress.c src/global.h src/statx.h; do
    [ -f "$src/$f" ] || { echo "$0: $src has no $f: not an xfstests checkout" >&2; exit 2; }
done
mkdir -p "$out/include"
cat >"$out/include/config.h" <<'H'
/* Written by lamina's bench/outside/build_fsx_fsstress.sh: what glibc on Linux provides. */
#define HAVE_SYS_TYPES_H 1
#define HAVE_SYS_STAT_H 1
#define HAVE_SYS_STATVFS_H 1
#define HAVE_SYS_TIME_H 1
#define HAVE_SYS_IOCTL_H 1
#define HAVE_SYS_WAIT_H 1
#define HAVE_MALLOC_H 1
#define HAVE_DIRENT_H 1
#define HAVE_STDLIB_H 1
#define HAVE_UNISTD_H 1
#define HAVE_ERRNO_H 1
#define HAVE_STRING_H 1
#define HAVE_SYS_FCNTL_H 1
#define HAVE_TIME_H 1
#define HAVE_SYS_PARAM_H 1
#define HAVE_LIBGEN_H 1
#define HAVE_ASSERT_H 1
#define STDC_HEADERS 1
#define HAVE_STRINGS_H 1
#define HAVE_ERR_H 1
#define HAVE_LINUX_FALLOC_H 1
#define HAVE_SYS_MMAN_H 1
#define HAVE_LINUX_FIEMAP_H 1
#define HAVE_SYS_PRCTL_H 1
#define HAVE_RENAMEAT2 1
#define HAVE_COPY_FILE_RANGE 1
#define HAVE_XFS_XFS_H 1
#include <time.h>
H
cflags="-O2 -g -include getopt.h -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -DFALLOCATE -DHAVE_COPY_FILE_RANGE -I$out/include -I$src/include -I$src/src"
for prog in fsx fsstress; do
    # shellcheck disable=SC2086
    gcc $cflags -o "$out/$prog" "$src/ltp/$prog.c" -lm
done
echo "built $out/fsx $out/fsstress (xfstests $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo '?'))"
