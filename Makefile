# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR ?= .device-sim

.PHONY: test demo sysdeps venv bench clean

# System packages: SoftHSM2 (the token used by default, in tests and in the demo).
sysdeps:
	@if ! command -v softhsm2-util >/dev/null 2>&1; then \
		echo "installing softhsm2 with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: sysdeps $(STAMP)

test: venv
	$(VENV)/bin/pytest -q

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash docs/demo.sh $(HOME_DIR)

bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash bench/run_all.sh

clean:
	rm -rf $(VENV) $(HOME_DIR) .pytest_cache
