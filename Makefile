# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR ?= .device-sim

.PHONY: test demo sysdeps venv bench clean

# System packages: SoftHSM2 (the token used by default, in tests and in the demo),
# OpenSC's PKCS#11 modules (pkcs11-spy: the tests run hsm-setup through a module that is
# not SoftHSM by name), and a software TPM 2.0 token for tests/tpm (device_sim/testing/tpm.py):
# the emulator (swtpm, swtpm-tools), the resource manager on a session D-Bus (tpm2-abrmd,
# libtss2-tcti-tabrmd0, dbus), the PKCS#11 module and its token tool (libtpm2-pkcs11-1,
# libtpm2-pkcs11-tools) and tpm2-tools, which that tool runs.
# opensc: pkcs11-tool, which the bring-your-own-PKI tests use to put objects on a token as a
# factory station would (tests/hsm_setup/test_byo.py).
SYSPKGS := softhsm2 opensc-pkcs11 opensc swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools dbus
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
