"""SAS tokens and certificate strings in bodies."""

import base64
from urllib.parse import quote_plus

import pytest

from device_sim.stub.core.cert_input import parse_certificate
from device_sim.stub.core.errors import DpsError
from device_sim.stub.core.sas import SasError, covers, make_token, verify_token

from device_sim.testing import TestCA

from .env import b64_der, b64_pem, pem

KEY = b"k" * 32


def test_token_round_trip_and_rejections():
    token = make_token("mydps.example", KEY, now=1000, ttl=60)
    assert token.startswith("SharedAccessSignature sr=mydps.example&sig=")
    verify_token(token, KEY, "mydps.example/enrollments/x", now=1059)
    with pytest.raises(SasError, match="expired"):
        verify_token(token, KEY, "mydps.example/enrollments/x", now=1060)
    with pytest.raises(SasError, match="signature"):
        verify_token(token, b"other" * 8, "mydps.example/x", now=1000)
    tampered = token.replace("se=1060", "se=9999")
    with pytest.raises(SasError, match="signature"):
        verify_token(tampered, KEY, "mydps.example/x", now=1000)
    for broken in (None, "", "SharedAccessSignature sr=a", "SharedAccessSignature sr=a&sr=b&sig=c&se=1",
                   "SharedAccessSignature sr=a&sig=b&se=soon"):
        with pytest.raises(SasError):
            verify_token(broken, KEY, "a", now=0)


def test_resource_prefix_is_segment_wise_and_case_insensitive():
    assert covers("mydps.example", "MyDps.Example/enrollments/a")
    assert covers(quote_plus("https://mydps.example/enrollments"), "mydps.example/enrollments/a")
    assert not covers("mydps.example/enroll", "mydps.example/enrollments/a")
    assert not covers("mydps.example", "mydps.example.evil/x")


def test_signature_with_other_url_encoding_is_accepted():
    # some SDKs encode with quote_plus and upper-case hex; the signed text is the sr as sent
    import hashlib
    import hmac
    sr = quote_plus("mydps.example/enrollments")
    sig = base64.b64encode(hmac.new(KEY, f"{sr}\n2000".encode(), hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature skn=provisioningserviceowner&se=2000&sr={sr}&sig={quote_plus(sig)}"
    verify_token(token, KEY, "mydps.example/enrollments/a", now=1000)


def test_certificate_strings():
    cert = TestCA("Test Root").cert
    for text in (pem(cert), b64_pem(cert), b64_der(cert), "\n" + b64_der(cert)[:40] + "\n" + b64_der(cert)[40:]):
        assert parse_certificate(text) == cert
    for text in (None, 5, "", "  ", "abc", base64.b64encode(b"junk").decode(), pem(cert)[:100]):
        with pytest.raises(DpsError) as info:
            parse_certificate(text, "the thing")
        assert info.value.code == 400000 and "the thing" in info.value.message
