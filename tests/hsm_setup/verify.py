"""Chain verification with cryptography's X.509 verifier (what the tests trust)."""

from cryptography import x509
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store


def verify_client_chain(leaf: x509.Certificate, intermediates: list, root: x509.Certificate):
    """Verify leaf -> intermediates -> root as a TLS client certificate.

    DPS device certificates carry no subjectAltName (the identity is the CN), so the
    web-PKI end-entity policy is relaxed for that one extension only.
    """
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    verifier = (PolicyBuilder().store(Store([root]))
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
                .build_client_verifier())
    return verifier.verify(leaf, intermediates)
