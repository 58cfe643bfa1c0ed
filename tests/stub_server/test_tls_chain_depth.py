"""The device port stops OpenSSL's own chain building at the leaf (verify depth 0, a
speed measure: its verdict was thrown away anyway). These tests pin that this changes
nothing the application sees: chains of any length arrive complete and in the order sent."""

from __future__ import annotations

import json
import ssl

import pytest

from .conftest import client_context, read_response, tls_connect
from .test_transport import request_bytes


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_long_chain_arrives_whole_despite_verify_depth_0(echo_listener, server_identity, file_cas,
                                                           tmp_path, version):
    cas = [file_cas.inter2]
    for level in range(5):  # root, inter1, inter2, then five more CAs below: 9 certificates
        cas.append(cas[-1].issue_intermediate(f"deep-{level}"))
    leaf = cas[-1].issue_leaf("dev-deep")
    sent = [leaf, *reversed(cas), file_cas.inter1, file_cas.root]
    chain, key = leaf.write(tmp_path, "deep", sent[1:])
    context = client_context(server_identity.ca_cert, chain, key, version)
    with tls_connect(echo_listener.port, context) as sock:
        sock.sendall(request_bytes("PUT", "/0ne001/registrations/dev-deep/register?api-version=1",
                                   b'{"registrationId":"dev-deep"}'))
        status, _, raw = read_response(sock)
    assert status == 200
    assert json.loads(raw)["chain"] == [item.cert.subject.rfc4514_string() for item in sent]
