"""A device key named by a PKCS#11 URI that picks its token by serial= or slot-id= alone."""

from __future__ import annotations

import pytest

from device_sim.common.errors import UserError
from device_sim.testing import TokenPki
from hsm_setup import device_keys, tokens


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = TokenPki(tmp_path_factory.mktemp("uri-serial"))
    pki.ca("root")
    pki.device("dev-serial", ca="root")
    return pki


def _token(pki):
    return tokens.token_info(tokens.find_token(pki.lib(), pki.device_token))


def _open(pki, uri):
    return device_keys.open_device_key(pki.context, uri, module=pki.module_path, login=False)


def test_serial_alone_finds_the_token(pki):
    key = _open(pki, f"pkcs11:serial={_token(pki).serial};object=dev-serial")
    assert key.token_label == pki.device_token


def test_slot_id_alone_finds_the_token(pki):
    key = _open(pki, f"pkcs11:slot-id={_token(pki).slot_id};object=dev-serial")
    assert key.token_label == pki.device_token


def test_a_serial_no_token_has_is_one_line(pki):
    with pytest.raises(UserError, match="no token matches"):
        _open(pki, "pkcs11:serial=0000nosuchtoken;object=dev-serial")
