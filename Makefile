# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR ?= .device-sim

.PHONY: test demo sysdeps venv bench clean

# System packages: SoftHSM2 (the token used by default, in tests and in the demo) and
# OpenSC's PKCS#11 modules (pkcs11-spy: the tests run hsm-setup through a module that is
# not SoftHSM by name).
SYSPKGS := softhsm2 opensc-pkcs11
sysdeps:
	@missing=$$(for p in $(SYSPKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
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
