"""Errors a script can read (issue 15, item 4): with --json every failure is also one JSON
object on stdout; messages name our own verbs; mistyped names get 'did you mean'; a
mistyped --home is not created by verbs that only read; PIN files others can read warn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from device_sim.cli import hsm_setup as hsm_cli
from device_sim.cli import main as device_cli
from device_sim.cli.durations import human_duration
from device_sim.common.errors import Notice
from device_sim.stub import server
from hsm_setup.pins import read_pin_file


def run(entry, capsys, *argv):
    capsys.readouterr()
    try:
        code = entry.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def json_error(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])["error"]


@pytest.fixture
def emulator(tmp_path):
    home = tmp_path / "stub-home"
    stub = server.StubServer(server.ServeOptions(home=home), log=lambda m: None)
    stub.start()
    yield home
    stub.close()


def test_usage_error_with_json_is_a_json_object(capsys):
    code, out, err = run(hsm_cli, capsys, "ca", "list", "--bogus", "--json")
    assert code == 2
    error = json_error(out)
    assert error == {"code": "usage", "message": "unrecognized arguments: --bogus", "exit_code": 2}
    assert "unrecognized arguments: --bogus" in err


def test_without_json_stdout_stays_empty_on_failure(capsys, tmp_path):
    code, out, err = run(hsm_cli, capsys, "ca", "list", "--home", tmp_path / "nope")
    assert code == 2 and out == ""
    assert "no state directory at" in err


@pytest.mark.parametrize("entry,argv,exit_code", [
    (hsm_cli, ("ca", "list"), 2), (hsm_cli, ("ca", "show", "root"), 2),
    (hsm_cli, ("device", "list"), 2), (hsm_cli, ("device", "show", "dev-1"), 2),
    (hsm_cli, ("export", "bundle"), 2),
    (device_cli, ("stub", "status"), 4), (device_cli, ("stub", "ca", "list"), 4),
])
def test_read_only_verbs_do_not_create_a_mistyped_home(capsys, tmp_path, entry, argv, exit_code):
    missing = tmp_path / "typo-home"
    code, out, err = run(entry, capsys, *argv, "--home", missing, "--json")
    assert code == exit_code  # the stub verbs keep 4: no emulator answering
    error = json_error(out)
    assert error["code"] == "no_home" and error["exit_code"] == exit_code
    assert error["message"].startswith(f"no state directory at {missing}: ")
    assert not missing.exists()


def test_unknown_ca_in_the_token_registry_gets_did_you_mean(capsys, token_pki):
    code, out, err = run(hsm_cli, capsys, "ca", "show", "intermediat", "--home", token_pki.home, "--json")
    assert code == 2
    error = json_error(out)
    assert "unknown CA 'intermediat' (did you mean 'intermediate'?)" in error["message"]
    assert error["message"] in err


def test_verify_without_a_code_names_our_verbs(capsys, emulator, token_pki):
    pem = token_pki.root.pem_path
    assert run(device_cli, capsys, "stub", "ca", "upload", "root", pem, "--home", emulator)[0] == 0
    code, out, err = run(device_cli, capsys, "stub", "ca", "verify", "root", pem,
                         "--home", emulator, "--json")
    assert code == 3
    error = json_error(out)
    assert error["code"] == "bad_request" and error["exit_code"] == 3
    assert "`device-sim stub ca code root`" in error["message"]
    assert "`hsm-setup ca verification-cert root --code CODE" in error["message"]
    assert "generateVerificationCode" not in error["message"] + err


def test_verify_with_a_stale_code_says_to_make_a_new_one(capsys, emulator, token_pki, tmp_path):
    pem = token_pki.root.pem_path
    run(device_cli, capsys, "stub", "ca", "upload", "root", pem, "--home", emulator)
    assert run(device_cli, capsys, "stub", "ca", "code", "root", "--home", emulator)[0] == 0
    # the CA certificate itself is not a proof: its CN is not the code
    code, out, err = run(device_cli, capsys, "stub", "ca", "verify", "root", pem, "--home", emulator)
    assert code == 3 and out == ""
    assert "current code" in err and "device-sim stub ca code root" in err


def test_unknown_names_on_the_emulator_get_did_you_mean(capsys, emulator, token_pki):
    run(device_cli, capsys, "stub", "ca", "upload", "line-root", token_pki.root.pem_path, "--home", emulator)
    code, out, err = run(device_cli, capsys, "stub", "ca", "get", "line-rot", "--home", emulator, "--json")
    assert code == 3
    error = json_error(out)
    assert error["code"] == "not_found"
    assert "(did you mean 'line-root'?)" in error["message"]
    group = ("stub", "group", "create", "factory-a", "--ca-ref", "line-root", "--home", emulator)
    assert run(device_cli, capsys, *group)[0] == 0
    code, out, err = run(device_cli, capsys, "stub", "group", "disable", "factory-b", "--home", emulator)
    assert code == 3 and "(did you mean 'factory-a'?)" in err
    code, out, err = run(device_cli, capsys, "stub", "group", "get", "zzzz", "--home", emulator)
    assert code == 3 and "did you mean" not in err


def test_unreachable_emulator_has_its_own_code(capsys, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code, out, err = run(device_cli, capsys, "stub", "status", "--home", home, "--json")
    error = json_error(out)
    assert (code, error["code"], error["exit_code"]) == (4, "unreachable", 4)


def test_error_classes_carry_their_slug(capsys, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    code, out, err = run(device_cli, capsys, "stub", "ca", "upload", "x", bad, "--home", tmp_path, "--json")
    assert code == 2 and json_error(out)["code"] == "certificate"


def test_a_pin_file_others_can_read_warns(tmp_path):
    pin = tmp_path / "user.pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.warns(Notice, match=f"PIN file {pin} is readable by others \\(mode 644\\)"):
        assert read_pin_file(pin) == "1234"
    pin.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_pin_file(pin) == "1234"


def test_the_cli_prints_the_pin_warning_after_success_only(softhsm_home):
    shared, private = softhsm_home.pin_file, softhsm_home.so_pin_file
    shared.chmod(0o644)
    private.chmod(0o600)
    result = softhsm_home.cli("token", "init", "t1", "--pin-file", shared, "--so-pin-file", private)
    assert result.code == 0, result.err
    assert result.err.splitlines() == [
        f"hsm-setup: warning: user PIN file {shared} is readable by others (mode 644); "
        f"run `chmod 600 {shared}`"]
    # A failure stays one line: the error, no warning.
    wrong = softhsm_home.home.parent / "wrong.pin"
    wrong.write_text("0000\n")
    result = softhsm_home.cli("ca", "create", "r", "--token", "t1", "--pin-file", wrong)
    assert result.code == 2 and len(result.err.splitlines()) == 1, result.err
    assert "wrong user PIN" in result.err


def test_durations_are_rounded_for_people(capsys, emulator):
    assert [human_duration(s) for s in (0.8437, 12.3456, 245.4, 7385)] == [
        "0.84 s", "12.3 s", "4 min 05 s", "2 h 03 min"]
    code, out, _ = run(device_cli, capsys, "stub", "status", "--home", emulator)
    assert code == 0
    uptime = [line for line in out.splitlines() if line.startswith("uptime\t")]
    assert uptime and uptime[0].endswith(" s")


def test_json_errors_from_a_subprocess(tmp_path):
    """What a script sees: exit code, one JSON line on stdout, one line on stderr."""
    done = subprocess.run([sys.executable, "-m", "device_sim.cli", "stub", "enroll", "get", "x",
                           "--home", tmp_path / "missing", "--json"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DEVICE_SIM_HOME": ""})
    assert done.returncode == 4
    assert json.loads(done.stdout)["error"]["code"] == "no_home"
    assert "device-sim stub serve" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
