#!/bin/bash
# podman's own system tests (github containers/podman, tag v4.3.1, test/system/*.bats), run with
# PODMAN= pointing at a wrapper around lamina, and around podman itself as the reference.
#
#   bench/outside/podman_bats.sh SYSTEM_DIR [NAME.bats...]
#
# SYSTEM_DIR is test/system of a podman v4.3.1 checkout made outside the repository, e.g.
#   git -C PODMAN_CLONE archive v4.3.1 test/system | tar -x -C /work/ext-suites/podman-v4.3.1
# Needs root, bats (Debian package bats) and busybox-static; CANDIDATES (default "lamina podman")
# picks the runs, OUT where the TAP output goes, BATS_FILTER a regex of test names to run.
#
# Only the suite's shared setup is rewritten, to commands docker has (its original removes
# containers with podman-only flags, lists images through Go templates and pulls its test image
# from quay.io): the override appended to helpers.bash removes every container and every image
# but the test image, and loads that image from an archive when it is missing. The test image is
# a local stand-in for quay.io/libpod/testimage:20220615, built by lamina on the busybox base with
# the files, labels, working directory and command build-testimage gives the real one.
#
# Prints, per candidate: "podman-bats CANDIDATE pass=N fail=N skip=N", then the tests the
# reference passes and lamina fails ("lamina-only-failure: NAME").
set -eu
. "$(dirname "$0")/common.sh"
outside_usage $# 1 "SYSTEM_DIR [NAME.bats...]"
outside_need_root "podman's system tests"
# Mounts the run makes (containers' unions, `podman mount`) stay out of the namespaces other
# programs create meanwhile, where an unmount here could not reach them.
outside_in_private_namespace "$@"
command -v bats >/dev/null || { echo "$0: bats is not installed (apt-get install bats)" >&2; exit 2; }
system=$(cd "$1" && pwd)
shift
[ -f "$system/helpers.bash" ] || { echo "$0: $system has no helpers.bash" >&2; exit 2; }
outside_setup podman-bats ${CANDIDATES:-lamina podman}
files=${*:-}

FQN=quay.io/libpod/testimage:20220615

# --- the stand-in test image, built once by lamina and saved for both candidates -----------------
image_root=$out/image-root
context=$out/testimage
mkdir -p "$context"
printf '20220615\n' >"$context/testimage-id"
touch --date=@1600000000 "$context/testimage-id"
printf '#!/bin/sh\necho Confirmed: testimage pause invoked as $0\nwhile :; do\n    sleep 0.1\ndone\n' \
    >"$context/pause"
chmod 755 "$context/pause"
cat >"$context/Dockerfile" <<EOF
FROM lamina/busybox
ADD testimage-id pause /home/podman/
LABEL created_by=test/system/build-testimage
LABEL created_at=2022-06-15T00:00:00Z
WORKDIR /home/podman
CMD ["/bin/echo", "This container is intended for podman CI testing"]
EOF
"$python" -m lamina --root "$image_root" build -q -t "$FQN" "$context" >/dev/null
"$python" -m lamina --root "$image_root" save -o "$out/testimage.tar" "$FQN"

# --- the suite, with its shared setup made docker-compatible -------------------------------------
suite=$out/system
rm -rf "$suite"
cp -a "$system" "$suite"
cat >>"$suite/helpers.bash" <<'EOF'

# --- appended by lamina's bench/outside/podman_bats.sh: the shared setup in docker's commands ---
function _remove_all_containers() {
    local ids
    ids=$($PODMAN ps -aq 2>/dev/null) || ids=
    if [ -n "$ids" ]; then $PODMAN rm -f $ids >/dev/null 2>&1 || true; fi
}

function basic_setup() {
    _remove_all_containers
    local name id keep
    for name in $($PODMAN images 2>/dev/null | awk 'NR > 1 { print $1 ":" $2 }'); do
        case "$name" in
        "$PODMAN_TEST_IMAGE_FQN"|"<none>:<none>") ;;
        *) $PODMAN rmi -f "$name" >/dev/null 2>&1 || true ;;
        esac
    done
    keep=$($PODMAN images -q --no-trunc "$PODMAN_TEST_IMAGE_FQN" 2>/dev/null) || keep=
    for id in $($PODMAN images -q --no-trunc 2>/dev/null); do
        if [ "$id" != "$keep" ]; then $PODMAN rmi -f "$id" >/dev/null 2>&1 || true; fi
    done
    if [ -z "$keep" ]; then
        $PODMAN load -i "$PODMAN_BATS_TESTIMAGE" >/dev/null
        keep=$($PODMAN images -q --no-trunc "$PODMAN_TEST_IMAGE_FQN")
    fi
    PODMAN_TEST_IMAGE_ID=${keep#sha256:}
    PODMAN_TEST_IMAGE_ID=${PODMAN_TEST_IMAGE_ID:0:12}
    PODMAN_TMPDIR=$(mktemp -d --tmpdir=${BATS_TMPDIR:-/tmp} podman_bats.XXXXXX)
    MOST_RECENT_PODMAN_COMMAND=
}

function basic_teardown() {
    echo "# [teardown]" >&2
    _remove_all_containers
    command rm -rf $PODMAN_TMPDIR
}
EOF

bats_files() {
    if [ -n "$files" ]; then
        for f in $files; do echo "$suite/$f"; done
    else
        ls "$suite"/*.bats
    fi
}

run_bats() {  # CANDIDATE: the TAP output in $out/CANDIDATE.tap
    filter=()
    if [ -n "${BATS_FILTER:-}" ]; then filter=(--filter "$BATS_FILTER"); fi
    # shellcheck disable=SC2046
    PODMAN_BATS_TESTIMAGE=$out/testimage.tar bats --tap "${filter[@]}" $(bats_files) \
        >"$out/$1.tap" 2>"$out/$1.stderr" || true
    awk -v who="$1" '
        /^ok / { if ($0 ~ /# skip/) skip++; else pass++ }
        /^not ok / { fail++ }
        END { printf "podman-bats %s pass=%d fail=%d skip=%d\n", who, pass, fail, skip }' "$out/$1.tap"
}

clean_up_lamina() {  # what failing (or interrupted) tests left: containers, `podman mount`s under $out
    [ -x "$out/bin-lamina/podman" ] || return 0
    ids=$("$out/bin-lamina/podman" ps -aq 2>/dev/null) || ids=
    if [ -n "$ids" ]; then "$out/bin-lamina/podman" rm -f $ids >/dev/null 2>&1 || true; fi
    awk -v out="$out/" 'index($5, out) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r mnt; do fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt"; done
}
trap clean_up_lamina EXIT
trap 'exit 130' INT TERM HUP

for candidate in $candidates; do
    case "$candidate" in
    lamina)
        bin=$out/bin-lamina
        mkdir -p "$bin"
        rm -rf "$out/lamina-root"
        printf '#!/bin/sh\nexec %s -m lamina --root %s "$@"\n' "$python" "$out/lamina-root" >"$bin/podman"
        chmod 755 "$bin/podman"
        PODMAN=$bin/podman run_bats lamina
        clean_up_lamina
        ;;
    podman)
        # podman in a private, throwaway environment (bench/podman_env.py) behind a wrapper.
        (cd "$repo" && "$python" -m bench.outside.podman_wrapper "$out/bin-podman" -- \
            bash -c "$(declare -f run_bats bats_files); out='$out' suite='$suite' files='$files' \
                     PODMAN='$out/bin-podman/podman' run_bats podman")
        ;;
    *) echo "unknown candidate $candidate" >&2; exit 2 ;;
    esac
done

if [ -f "$out/lamina.tap" ] && [ -f "$out/podman.tap" ]; then
    sed -n 's/^ok [0-9]* \([^#]*\)$/\1/p' "$out/podman.tap" | sed 's/ *$//' | sort >"$out/podman.passed"
    sed -n 's/^ok [0-9]* \([^#]*\)$/\1/p' "$out/lamina.tap" | sed 's/ *$//' | sort >"$out/lamina.passed"
    comm -23 "$out/podman.passed" "$out/lamina.passed" | sed 's/^/lamina-only-failure: /'
    echo "podman-bats both-pass=$(comm -12 "$out/podman.passed" "$out/lamina.passed" | wc -l)" \
         "podman-passes=$(wc -l <"$out/podman.passed")"
fi
