# The preamble bench/outside/*.sh share. Each script sources it after `set -eu`:
#
#   . "$(dirname "$0")/common.sh"
#
# outside_usage ARGC MIN USAGE     print USAGE and exit 2 when ARGC < MIN
# outside_need_root WHAT           exit 2 unless root (WHAT: why root is needed)
# outside_in_private_namespace ARGS...
#                                  the first time: run this script again with ARGS in a private
#                                  mount namespace (its mounts vanish with it and are never copied
#                                  into namespaces others create meanwhile); the second time: return
# outside_setup NAME CANDIDATES... set repo, python (LAMINA_PYTHON, default the repository's venv),
#                                  candidates (CANDIDATES, default kernel lamina fuse-overlayfs) and
#                                  out (OUT, default a new /tmp/NAME-results.XXXXXX), and say where
# mount_union CANDIDATE BASE [WORKDIR]
#                                  mount BASE/lower + BASE/upper on BASE/mnt (workdir BASE/work)
# unmount_union MNT                unmount whichever kind of union is on MNT
#
# POSIX sh: unionmount.sh runs under /bin/sh.

outside_usage() {
    if [ "$1" -lt "$2" ]; then
        echo "usage: $0 $3" >&2
        exit 2
    fi
}

outside_need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$0: $1 must run as root" >&2
        exit 2
    fi
}

outside_in_private_namespace() {
    if [ "${LAMINA_OUTSIDE_NAMESPACE:-}" != "$0" ]; then
        LAMINA_OUTSIDE_NAMESPACE=$0 exec unshare -m --propagation private "$0" "$@"
    fi
}

outside_setup() {
    _name=$1
    shift
    repo=$(cd "$(dirname "$0")/../.." && pwd)
    python=${LAMINA_PYTHON:-$repo/.venv/bin/python}
    candidates=${*:-kernel lamina fuse-overlayfs}
    out=${OUT:-$(mktemp -d "/tmp/$_name-results.XXXXXX")}
    mkdir -p "$out"
    echo "results in $out"
}

mount_union() {
    _opts="lowerdir=$2/lower,upperdir=$2/upper,workdir=${3:-$2/work}"
    case "$1" in
    kernel) mount -t overlay overlay -o "$_opts" "$2/mnt" ;;
    lamina) "$python" -m unionfs -o "$_opts" "$2/mnt" ;;
    fuse-overlayfs) fuse-overlayfs -o "$_opts" "$2/mnt" ;;
    *) echo "unknown candidate $1" >&2; return 2 ;;
    esac
}

unmount_union() {
    umount "$1" 2>/dev/null || fusermount3 -u "$1" 2>/dev/null || { sleep 1; umount "$1" 2>/dev/null; } \
        || umount -l "$1"
}
