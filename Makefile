# lamina: every target is idempotent and works on a fresh Debian 12 machine as root.
#   make demo   build and run an image from the embedded busybox base (does its own set-up)
#   make test   the whole offline test suite (does its own set-up)
#   make bench  the benchmarks against the kernel's overlayfs, fuse-overlayfs and podman

SHELL := /bin/bash
# Debian's interpreter: every user can run it (the one first on root's PATH may live under /root).
PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What lamina itself needs (`make install`, and so `make demo`): FUSE and fusermount3; pyfuse3's
# build (a C compiler, libfuse3's headers, pkg-config, Python's headers); newuidmap/newgidmap and
# slirp4netns for rootless containers; the static busybox the embedded base image is made from.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev \
	uidmap slirp4netns busybox-static
# What the tests add: the outside references (fuse-overlayfs, podman, skopeo, a registry), xattr
# and ACL tools, debootstrap for the opt-in network tests, chromium for the rendered inspector pages.
TEST_APT_PACKAGES := fuse-overlayfs attr acl iproute2 psmisc util-linux \
	podman skopeo docker-registry debootstrap chromium
# What the benchmarks add: the competitors, and unshare(1) for a private mount namespace.
BENCH_APT_PACKAGES := fuse-overlayfs podman util-linux
PYTEST_ARGS ?=

.PHONY: install system-packages test-packages bench-packages venv bytecode demo test lint bench bench-quick clean

install: system-packages venv bytecode

# Compiled once here: these machines set PYTHONDONTWRITEBYTECODE=1, and without .pyc files every
# lamina command would recompile every module it imports (~0.2 s per command).
bytecode: venv
	$(PY) -m compileall -q lamina unionfs builder runner bench
	$(PY) -m unionfs.bundle  # the filesystem server's imports in one file (see unionfs/bundle.py)

# $(call apt_install,PACKAGES): install those not installed yet (apt-get update only then).
define apt_install
@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "make $@: system packages all present"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "make $@: installing system packages needs root; as root run: apt-get update && apt-get install -y $$missing" >&2; exit 1; \
	else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi
endef

system-packages:
	$(call apt_install,$(APT_PACKAGES))

test-packages:
	$(call apt_install,$(TEST_APT_PACKAGES))

bench-packages:
	$(call apt_install,$(BENCH_APT_PACKAGES))

# The tests and the benchmarks install what they add (prerequisites of their own, beside the recipes).
test: test-packages
bench bench-quick: bench-packages

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode: a plain path entry in a .pth file; setuptools' default editable finder costs
	# ~60 ms at every start of every lamina process.
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

demo: install
	$(VENV)/bin/python -m lamina.demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)
	@# Again with every start-up trick and patch of another library off (unionfs/startup.py, TRICKS):
	@# the filesystem against the kernel's overlayfs, mounts, and the command line (~2-3 min more).
	LAMINA_NO_PATCHES=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) -k "not userns" \
		tests/test_unionfs_mount.py tests/test_unionfs_oracle_ops.py tests/test_unionfs_differential.py \
		tests/test_unionfs_crash.py tests/test_unionfs_unpriv.py tests/test_cli.py tests/test_runner_cli.py

lint: install
	$(VENV)/bin/ruff check lamina unionfs builder runner tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: install
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
