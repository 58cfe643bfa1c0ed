"""The emulator dashboard in a real browser (Debian's Chromium driven by Playwright): what
the emulator holds appears, registrations show up as they happen, and the page's buttons
disable an enrollment (the emulator then refuses the device) and delete a registration.
Without the token every request is refused."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from device_sim.cli import main as device_cli
from device_sim.stub import server
from device_sim.stub.net import dashboard

from .emulator_proc import cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 10_000


@pytest.fixture
def emulator(tmp_path):
    stub = server.StubServer(server.ServeOptions(home=tmp_path / "stub-home", retry_after=0),
                             [dashboard.listener_factory()], log=lambda m: None)
    ready = stub.start()
    yield ready
    stub.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "the dashboard test needs Debian's chromium (make sysdeps)"
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def admin(capsys, ready, *argv) -> int:
    code = device_cli.main(["stub", *map(str, argv), "--home", ready["home"]])
    capsys.readouterr()
    return code


def register(pki, ready, registration_id: str):
    return cli("register", registration_id, "--json", "--endpoint", ready["device_url"],
               "--id-scope", ready["id_scope"], "--trust", ready["ca_cert"], "--timeout", "20",
               env=pki.env(), check=False)


def status_of(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_every_request_without_the_token_is_refused(emulator):
    url = emulator["dashboard_url"]
    base = url.split("/d/")[0]
    token = url.split("/d/")[1].strip("/")
    assert status_of(url) == 200 and status_of(url + "api/state") == 200
    for path in ("/", "/d/", "/d/wrong/", "/d/wrong/api/state", "/d/wrong/app.js", "/app.js",
                 f"/x/d/{token}/api/state"):
        assert status_of(base + path) == 403, path
    # A POST that names the token only in its URL (what a foreign page can make a browser
    # send) is refused; with the header it is heard (and fails on the unknown name).
    action = url + "api/registrations/nobody/delete"
    assert status_of(action, b"{}") == 403
    assert status_of(action, b"{}", {dashboard.TOKEN_HEADER: "wrong"}) == 403
    assert status_of(action, b"{}", {dashboard.TOKEN_HEADER: token}) == 404


def test_dashboard_shows_the_emulator_and_its_buttons_act(emulator, browser, token_pki, capsys, tmp_path):
    ready = emulator
    assert admin(capsys, ready, "ca", "upload", "token-root", token_pki.root.pem_path, "--verified") == 0
    assert admin(capsys, ready, "ca", "upload", "spare-line", token_pki.line.pem_path) == 0
    assert admin(capsys, ready, "group", "create", "token-devices", "--ca-ref", "token-root") == 0

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(ready["dashboard_url"])

    cas = page.locator("#cas tbody")
    cas.locator("tr[data-name='token-root']", has_text="verified").wait_for(timeout=WAIT_MS)
    assert "unverified" in cas.locator("tr[data-name='spare-line']").inner_text()
    group = page.locator("#enrollments tr[data-id='token-devices']")
    group.wait_for(timeout=WAIT_MS)
    assert "enabled" in group.inner_text() and "CA token-root" in group.inner_text()
    assert page.locator("#registrations td.empty").inner_text() == "no registrations yet"

    # A device registers while the page is open: the next poll shows it.
    first = register(token_pki, ready, "device-ec-p256")
    assert first.returncode == 0, first.stderr
    row = page.locator("#registrations tr[data-id='device-ec-p256']")
    row.wait_for(timeout=WAIT_MS)
    assert "assigned" in row.inner_text()
    assert "stub-hub-1.azure-devices.net" in row.inner_text()
    bars = page.locator("#throughput .bar span")
    bars.first.wait_for(timeout=WAIT_MS)
    assert bars.first.inner_text() == "1"

    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # Disable from the page: the state changes, and the emulator refuses the device.
    group.get_by_role("button", name="Disable").click()
    group.locator(".state", has_text="disabled").wait_for(timeout=WAIT_MS)
    second = register(token_pki, ready, "device-ec-p256")
    assert second.returncode == 3, second.stdout + second.stderr  # EXIT_DISABLED
    assert json.loads(second.stdout)["status"] == "disabled"
    row.locator("td", has_text="disabled").wait_for(timeout=WAIT_MS)

    # Delete the registration record from the page.
    row.get_by_role("button", name="Delete").click()
    row.wait_for(state="detached", timeout=WAIT_MS)
    assert admin(capsys, ready, "registration", "get", "device-ec-p256") == 3
    assert page.locator("#action").inner_text() == "deleted device-ec-p256"

    # And enable again from the page.
    group.get_by_role("button", name="Enable").click()
    group.locator(".state", has_text="enabled").wait_for(timeout=WAIT_MS)
    assert register(token_pki, ready, "device-ec-p256").returncode == 0
    assert errors == []
    page.close()


def test_stub_serve_names_the_dashboard_in_its_ready_line(tmp_path):
    from device_sim.testing import Emulator

    running = Emulator.spawn(tmp_path / "served")
    try:
        url = running.ready["dashboard_url"]
        assert url.startswith("http://127.0.0.1:") and "/d/" in url
        assert status_of(url + "api/state") == 200
        assert status_of(url.split("/d/")[0] + "/d/x/api/state") == 403
        assert url.split("/d/")[1].strip("/") not in running.log.read_text()
    finally:
        running.stop()
    quiet = Emulator.spawn(tmp_path / "quiet", "--no-dashboard")
    try:
        assert "dashboard_url" not in quiet.ready
    finally:
        quiet.stop()


def test_throughput_buckets_registrations_by_their_last_update():
    from device_sim.stub.dashboard_view import BUCKETS, throughput

    now = 1_800_000_005.0  # 5 s into a bucket
    records = [{"lastUpdatedDateTimeUtc": "2027-01-15T08:00:03.000000Z"},   # now - 2 s
               {"lastUpdatedDateTimeUtc": "2027-01-15T07:59:58.500000Z"},   # previous bucket
               {"lastUpdatedDateTimeUtc": "2027-01-15T07:50:00.000000Z"},   # too old
               {"lastUpdatedDateTimeUtc": "not a time"}, {}]
    buckets = throughput(records, now)
    assert len(buckets) == BUCKETS
    assert [b["count"] for b in buckets[-2:]] == [1, 1] and sum(b["count"] for b in buckets) == 2
    assert buckets[-1]["start"] == "2027-01-15T08:00:00Z"
