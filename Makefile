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
# factory station would (tests/hsm_setup/test_byo.py). OpenSSL's command line and curl: the
# token key through standard OpenSSL (docs/openssl.md). Chromium: the browser the dashboard
# test drives through Playwright (which is told not to fetch a browser of its own).
SYSPKGS := softhsm2 opensc-pkcs11 opensc swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools dbus openssl curl chromium
# pkcs11-provider (the OpenSSL 3 provider for token keys) is in Debian 12 only in the
# backports suite. That suite is added from the mirror the machine's own `bookworm` entry
# names (apt parses sources.list and deb822 .sources alike), so no host is written here.
BACKPORTS      := bookworm-backports
BACKPORTS_PKGS := pkcs11-provider
BACKPORTS_LIST := /etc/apt/sources.list.d/device-sim-backports.list
sysdeps:
	@missing=$$(for p in $(SYSPKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@missing=$$(for p in $(BACKPORTS_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if ! apt-get indextargets --no-release-info --format '$$(RELEASE)' | grep -qx '$(BACKPORTS)'; then \
			uri=$$(apt-get indextargets --no-release-info --format '$$(REPO_URI)' 'Release: bookworm' 'Target-Of: deb' | head -n 1); \
			if [ -z "$$uri" ]; then echo "no 'bookworm' entry in the apt sources to take the mirror from: add $(BACKPORTS) and install $$missing by hand" >&2; exit 1; fi; \
			echo "adding $(BACKPORTS) ($$uri) as $(BACKPORTS_LIST)"; \
			echo "deb $$uri $(BACKPORTS) main" > $(BACKPORTS_LIST); \
		fi; \
		echo "installing $$missing from $(BACKPORTS) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t $(BACKPORTS) $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,distributed]'
	touch $(STAMP)

# The official azure-iot-device SDK pins paho-mqtt < 2, which the test extras cannot share:
# it gets its own venv, used by tests/openssl to register through the emulator with the
# token key (docs/openssl.md).
SDK_VENV  := $(VENV)/sdk
SDK_STAMP := $(SDK_VENV)/.installed
$(SDK_STAMP):
	python3 -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install -q azure-iot-device
	touch $(SDK_STAMP)

venv: sysdeps $(STAMP) $(SDK_STAMP)

# Test files run in parallel, one whole file per worker (`--dist loadfile`: a file's module
# fixtures - emulators, token PKIs - are built once); TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= auto
test: venv
	$(VENV)/bin/pytest -q -n $(TEST_JOBS) --dist loadfile

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash docs/demo.sh $(HOME_DIR)

bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash bench/run_all.sh

clean:
	rm -rf $(VENV) $(HOME_DIR) .pytest_cache

# The official service SDK (azure-iot-deviceprovisioning) shares the SDK venv: tests/stub_server
# creates and reads enrollments with it, and registers with azure-iot-device over MQTT and
# MQTT over WebSockets (docs/emulator.md, "WebSockets").
SERVICE_SDK_STAMP := $(SDK_VENV)/.service-sdk
$(SERVICE_SDK_STAMP): $(SDK_STAMP)
	$(SDK_VENV)/bin/python -m pip install -q azure-iot-deviceprovisioning
	touch $(SERVICE_SDK_STAMP)

venv: $(SERVICE_SDK_STAMP)
