"""Acknowledged registrations survive kill -9; many threads share one store safely."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from device_sim.testing import TestCA

from .env import Env, pem


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from device_sim.testing import TestCA
    sys.path.insert(0, sys.argv[1])
    from stub_core.env import Env
    env = Env(Path(sys.argv[2]))
    root = TestCA.from_pem(sys.argv[3].encode(), sys.argv[4].encode())
    i = 0
    while True:  # register until killed; print each ID once its 202 came back
        assert env.register(root.issue_leaf(f"dev-{i}")).status == 202
        print(f"dev-{i}", flush=True)
        i += 1
""")


def test_acknowledged_registrations_survive_kill_9(tmp_path):
    env = Env(tmp_path)
    root = TestCA("Test Root")
    env.upload_ca("root", root.cert)
    env.group("g", ca_name="root")
    env.store.close()
    key_pem = root.key_pem.decode()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent.parent),
                              str(tmp_path), pem(root.cert), key_pem],
                             stdout=subprocess.PIPE, text=True)
    acked = []
    for line in child.stdout:
        acked.append(line.strip())
        if len(acked) == 30:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL and len(acked) == 30
    env = Env(tmp_path)
    for registration_id in acked:
        record = env.call("GET", f"/registrations/{registration_id}")
        assert record.status == 200 and record.body["status"] == "assigned", registration_id


def test_many_threads_one_store(tmp_path):
    env = Env(tmp_path)
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert)
    env.group("g", ca_name="root")
    devices = [inter.issue_leaf(f"t-{i}") for i in range(200)]
    failures = []

    def work(chunk):
        for device in chunk:
            reply = env.provision(device)
            if reply.status != 200 or reply.body["status"] != "assigned":
                failures.append(reply)

    threads = [threading.Thread(target=work, args=(devices[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    listed = env.call("POST", "/registrations/g/query", headers={"x-ms-max-item-count": "1000"})
    assert len(listed.body) == 200


def test_changes_from_another_connection_reach_the_walk_cache(tmp_path):
    serving = Env(tmp_path)
    admin = Env(tmp_path)   # a second Store on the same file, as another process would have
    root = TestCA("Test Root")
    dev = root.issue_intermediate("I").issue_leaf("dev")
    assert serving.provision(dev).status == 401          # cache built: nothing enrolled
    admin.upload_ca("root", root.cert)
    admin.group("g", ca_name="root")
    assert serving.provision(dev).status == 200
    admin.group("g", ca_name="root", status="disabled")
    assert serving.provision(dev).body["status"] == "disabled"
    other_root = TestCA("Other")
    etag = admin.call("GET", "/certificates/root").body["etag"]
    replaced = admin.call("PUT", "/certificates/root", {"properties": {
        "certificate": pem(other_root.cert), "isVerified": True}}, headers={"If-Match": etag})
    assert replaced.status == 200
    assert serving.provision(dev).status == 401          # caReferences resolve by name, live
