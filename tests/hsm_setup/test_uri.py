import pytest
from hypothesis import given, strategies as st

from device_sim.common.errors import UserError
from hsm_setup.uri import Pkcs11Uri


def test_parse_percent_encoded_fields_and_id():
    uri = Pkcs11Uri.parse("pkcs11:token=My%20Token;object=dev%3B1;id=%01%02%FF;type=private"
                          "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/p")
    assert uri.token == "My Token"
    assert uri.object == "dev;1"
    assert uri.id == b"\x01\x02\xff"
    assert uri.type == "private"
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.pin_source == "file:/p"


def test_print_round_trips_and_escapes_separators():
    uri = Pkcs11Uri(token="a;b?c", object="x y/z", id=b"\x00\xab", serial="1234")
    text = str(uri)
    assert text.startswith("pkcs11:token=a%3Bb%3Fc;")
    assert "id=%00%AB" in text
    assert Pkcs11Uri.parse(text) == uri


def test_pin_value_never_printed():
    uri = Pkcs11Uri.parse("pkcs11:token=t;object=o?pin-value=s3cret")
    assert uri.pin_value == "s3cret"
    assert "s3cret" not in str(uri)
    assert "s3cret" not in repr(uri)
    assert "s3cret" not in str(uri.as_dict())
    assert "pin-value=s3cret" in uri.to_string(include_pin=True)


@pytest.mark.parametrize("text, word", [
    ("file:/x", "pkcs11:"),
    ("pkcs11:token", "no '=value'"),
    ("pkcs11:colour=red", "unknown"),
    ("pkcs11:token=a;token=b", "repeats"),
    ("pkcs11:slot-id=abc", "slot-id"),
    ("pkcs11:type=banana", "type"),
])
def test_bad_uris_are_user_errors(text, word):
    with pytest.raises(UserError, match=word):
        Pkcs11Uri.parse(text)


def test_error_message_hides_pin_value():
    with pytest.raises(UserError) as info:
        Pkcs11Uri.parse("file:x?pin-value=s3cret")
    assert "s3cret" not in str(info.value)


def test_vendor_attributes_survive():
    uri = Pkcs11Uri.parse("pkcs11:token=t;x-vendor=v%20w")
    assert uri.vendor == (("x-vendor", "v w"),)
    assert Pkcs11Uri.parse(str(uri)) == uri


@given(token=st.text(min_size=1, max_size=32), obj=st.text(min_size=1, max_size=64),
       key_id=st.binary(min_size=1, max_size=20))
def test_round_trip_any_text(token, obj, key_id):
    uri = Pkcs11Uri(token=token, object=obj, id=key_id)
    assert Pkcs11Uri.parse(str(uri)) == uri
