"""The session PKI (tests/conftest.py): token key properties, chains, CSRs, registries."""

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from hsm_setup import ca, csr, devices, keys, verification
from hsm_setup.key_types import key_spec
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

from .verify import verify_client_chain

DEVICE_IDS = ["device-ec-p256", "device-ec-p384", "device-rsa-2048", "device-line-1"]


def _objects(session, key_id):
    return {obj[Attribute.CLASS]: obj for obj in session.get_objects({Attribute.ID: key_id})}


@pytest.mark.parametrize("registration_id", DEVICE_IDS)
def test_device_private_key_cannot_leave_the_token(token_pki, registration_id):
    record = token_pki.devices[registration_id]
    session = token_pki.session(record.token_label)
    private = keys.find_private_key(session, record.key_id)
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.PRIVATE] is True
    assert private[Attribute.TOKEN] is True
    assert private[Attribute.NEVER_EXTRACTABLE] is True
    # EC keys hold the secret in CKA_VALUE, RSA keys in CKA_PRIVATE_EXPONENT (and the CRT parts)
    secret_attrs = ([Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2]
                    if record.key_type.startswith("rsa") else [Attribute.VALUE])
    for attr in secret_attrs:
        with pytest.raises(pkcs11.AttributeSensitive):
            private[attr]


def test_ca_private_keys_cannot_leave_the_token(token_pki):
    session = token_pki.session(token_pki.ca_token)
    for record in (token_pki.root, token_pki.intermediate, token_pki.line):
        private = keys.find_private_key(session, record.key_id)
        assert private[Attribute.EXTRACTABLE] is False and private[Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            private[Attribute.VALUE]


@pytest.mark.parametrize("registration_id", DEVICE_IDS)
def test_identity_objects_share_id_and_label(token_pki, registration_id):
    record = token_pki.devices[registration_id]
    found = _objects(token_pki.session(record.token_label), record.key_id)
    assert set(found) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE}
    assert {obj[Attribute.LABEL] for obj in found.values()} == {registration_id}
    assert found[ObjectClass.CERTIFICATE][Attribute.VALUE] == record.certificate
    uri = Pkcs11Uri.parse(record.uri)
    assert (uri.token, uri.object, uri.id) == (record.token_label, registration_id, record.key_id)


def test_ca_chain_is_stored_on_the_device_token(token_pki):
    session = token_pki.session(token_pki.device_token)
    for record in (token_pki.root, token_pki.intermediate, token_pki.line):
        (cert,) = session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: record.key_id})
        assert cert[Attribute.VALUE] == record.certificate
        assert cert[Attribute.LABEL] == record.name


@pytest.mark.parametrize("registration_id", DEVICE_IDS)
def test_every_issued_chain_verifies_up_to_the_root(token_pki, registration_id):
    record = token_pki.devices[registration_id]
    chain = record.chain_x509()
    assert chain[-1].subject == chain[-1].issuer  # ends in the self-signed root
    verified = verify_client_chain(record.certificate_x509(), chain[:-1], chain[-1])
    assert verified.chain[-1] == token_pki.root.x509()
    # the PEM files carry the same chain
    pem_chain = x509.load_pem_x509_certificates(record.chain_path.read_bytes())
    assert pem_chain == [record.certificate_x509(), *chain]


@pytest.mark.parametrize("registration_id", DEVICE_IDS)
def test_leaf_profile(token_pki, registration_id):
    leaf = token_pki.devices[registration_id].certificate_x509()
    cn = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [registration_id]
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None


def test_ca_profile(token_pki):
    for record in (token_pki.root, token_pki.intermediate, token_pki.line):
        cert = record.x509()
        ext = cert.extensions
        constraints = ext.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca is True
        usage = ext.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
    assert token_pki.intermediate.x509().issuer == token_pki.root.x509().subject
    token_pki.intermediate.x509().verify_directly_issued_by(token_pki.root.x509())
    token_pki.line.x509().verify_directly_issued_by(token_pki.intermediate.x509())


@pytest.mark.parametrize("registration_id", ["device-ec-p256", "device-ec-p384", "device-rsa-2048"])
def test_csr_signed_inside_the_token_verifies(token_pki, registration_id):
    record = token_pki.devices[registration_id]
    session = token_pki.session(record.token_label)
    spec = key_spec(record.key_type)
    private = keys.find_private_key(session, record.key_id)
    public = keys.find_public_key(session, record.key_id)
    request = x509.load_der_x509_csr(
        csr.build_csr(TokenSigner(private, spec), keys.public_key_info(public, spec), registration_id).dump())
    assert request.is_signature_valid
    assert request.public_key() == record.certificate_x509().public_key()
    assert request.subject.rfc4514_string() == f"CN={registration_id}"


def test_verification_certificate_signed_by_ca_key(token_pki):
    lib = token_pki.lib()
    issuer = ca.open_issuer(lib, token_pki.home, "intermediate", token_pki.pin)
    cert = verification.issue_verification_certificate(issuer, "0A1B2C3D4E5F")
    parsed = x509.load_der_x509_certificate(cert.dump())
    assert parsed.subject.rfc4514_string() == "CN=0A1B2C3D4E5F"
    ca_key = token_pki.intermediate.x509().public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    parsed.verify_directly_issued_by(token_pki.intermediate.x509())
    # the throw-away key was a session object: nothing new on the CA token
    session = token_pki.session(token_pki.ca_token)
    assert not list(session.get_objects({Attribute.LABEL: "verification"}))


def test_registry_lookup_is_case_insensitive_and_lists_everything(token_pki):
    record = devices.lookup_device(token_pki.home, "DEVICE-EC-P256")
    assert record.registration_id == "device-ec-p256"
    assert record.chain == tuple(c.certificate for c in ca.chain_of(token_pki.home, token_pki.intermediate))
    listed = {r.registration_id for r in devices.list_devices(token_pki.home)}
    assert listed == set(DEVICE_IDS)
    assert [c.name for c in ca.list_cas(token_pki.home)] == ["intermediate", "line", "root"]
    assert ca.load_ca(token_pki.home, "line").parent == "intermediate"
