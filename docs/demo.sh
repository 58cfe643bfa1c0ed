#!/usr/bin/env bash
# `make demo`: one device registers with the local DPS emulator over mutual TLS, its private
# key never leaving the SoftHSM token. Usage: bash docs/demo.sh [STATE_DIR] (default .device-sim)
#
# Re-runnable: the state directory is reused. Tokens, CAs and the device identity are created
# only when missing; the emulator keeps its database, the root CA is uploaded again (replacing
# the previous copy) and proof-of-possession-verified each run, so every run shows the full flow.
# The PINs live in files inside the state directory (mode 600) and are never printed.
set -euo pipefail

HOME_DIR="${1:-.device-sim}"
DEVICE="${DEMO_DEVICE:-demo-device-1}"
ROOT_CA="demo-root"
INT_CA="demo-intermediate"
GROUP="demo-group"

step() { printf '\n== %s\n' "$*"; }

umask 077
mkdir -p "$HOME_DIR"
HOME_DIR="$(cd "$HOME_DIR" && pwd)"
export DEVICE_SIM_HOME="$HOME_DIR"
PIN_FILE="$HOME_DIR/demo-user.pin"
SO_PIN_FILE="$HOME_DIR/demo-so.pin"

step "state directory $HOME_DIR"
for f in "$PIN_FILE" "$SO_PIN_FILE"; do
    if [ ! -s "$f" ]; then
        # A random PIN, written straight to a mode-600 file: it never appears on screen or in argv.
        od -An -N12 -tx1 /dev/urandom | tr -d ' \n' > "$f"
        chmod 600 "$f"
    fi
done
echo "PIN files: $PIN_FILE, $SO_PIN_FILE (mode 600)"

step "tokens 'ca' and 'devices' in SoftHSM (inside the state directory)"
tokens="$(hsm-setup token list --pin-file "$PIN_FILE" 2>/dev/null || true)"
for label in ca devices; do
    if printf '%s\n' "$tokens" | cut -f1 | grep -qx "$label"; then
        echo "token '$label' exists"
    else
        hsm-setup token init "$label" --pin-file "$PIN_FILE" --so-pin-file "$SO_PIN_FILE"
    fi
done

step "root CA '$ROOT_CA' and intermediate CA '$INT_CA' (keys inside token 'ca')"
hsm-setup ca show "$ROOT_CA" >/dev/null 2>&1 \
    && echo "CA '$ROOT_CA' exists" \
    || hsm-setup ca create "$ROOT_CA" --pin-file "$PIN_FILE"
hsm-setup ca show "$INT_CA" >/dev/null 2>&1 \
    && echo "CA '$INT_CA' exists" \
    || hsm-setup ca create "$INT_CA" --parent "$ROOT_CA" --pin-file "$PIN_FILE"

step "device identity '$DEVICE' (key generated inside token 'devices', certificate from '$INT_CA')"
hsm-setup device show "$DEVICE" >/dev/null 2>&1 \
    && echo "device '$DEVICE' exists" \
    || hsm-setup device create "$DEVICE" --ca "$INT_CA" --pin-file "$PIN_FILE"

step "start the DPS emulator"
SERVE_OUT="$HOME_DIR/demo-stub.out"
: > "$SERVE_OUT"
device-sim stub serve --port 0 --no-mqtt > "$SERVE_OUT" 2> "$HOME_DIR/demo-stub.log" &
STUB_PID=$!
stop_emulator() {
    if kill -0 "$STUB_PID" 2>/dev/null; then
        kill "$STUB_PID" 2>/dev/null || true
        wait "$STUB_PID" 2>/dev/null || true
        echo "emulator stopped"
    fi
}
trap stop_emulator EXIT
for _ in $(seq 1 100); do
    [ -s "$SERVE_OUT" ] && break
    kill -0 "$STUB_PID" 2>/dev/null || { echo "the emulator did not start:" >&2; cat "$HOME_DIR/demo-stub.log" >&2; exit 1; }
    sleep 0.2
done
[ -s "$SERVE_OUT" ] || { echo "the emulator printed no ready line within 20 s" >&2; exit 1; }
echo "emulator ready: $(head -n1 "$SERVE_OUT")"

step "upload the root CA to the emulator and prove possession of its key"
device-sim stub ca upload "$ROOT_CA" "$HOME_DIR/pki/ca/$ROOT_CA/cert.pem"
CODE="$(device-sim stub ca code "$ROOT_CA")"
echo "verification code: $CODE"
hsm-setup ca verification-cert "$ROOT_CA" --code "$CODE" --out "$HOME_DIR/demo-verification.pem" --pin-file "$PIN_FILE"
device-sim stub ca verify "$ROOT_CA" "$HOME_DIR/demo-verification.pem"

step "enrollment group '$GROUP' on the verified root"
device-sim stub group create "$GROUP" --ca-ref "$ROOT_CA"

step "the chain the device presents"
device-sim chain lint "$DEVICE" --pin-file "$PIN_FILE" --verified "$HOME_DIR/pki/ca/$ROOT_CA/cert.pem"

step "register '$DEVICE' over mTLS (TLS signature made inside the token)"
set +e
device-sim register "$DEVICE" --emulator --pin-file "$PIN_FILE" --timeout 30
status=$?
set -e
if [ "$status" -eq 0 ]; then
    echo; echo "demo finished: '$DEVICE' was assigned to a hub"
else
    echo; echo "demo failed: 'device-sim register' exited with $status (see docs/device.md for exit codes)" >&2
fi
exit "$status"
