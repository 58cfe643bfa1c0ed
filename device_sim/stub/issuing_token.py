"""An issuing CA whose key stays in a PKCS#11 token: `--issuing-ca-key 'pkcs11:...'`.

The only place the emulator touches a token, and only through hsm_setup's token layer
(module, session, key lookup, signing, certificate building), so it is easy to move onto
that layer's context object. The PIN comes from the URI (`pin-source` / `pin-value`) or
$PKCS11_PIN, never a prompt: the emulator runs unattended. One login per process; a lock
keeps the one session to one signature at a time.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.common.errors import UserError
from hsm_setup import certificates, keys, tokens
from hsm_setup.key_types import key_spec
from hsm_setup.context import Pkcs11Context
from hsm_setup.pins import ENV_USER_PIN, pin_from_source
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

_SPEC_BY_CURVE = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}


class TokenIssuer:
    def __init__(self, chain: list[x509.Certificate], signer: TokenSigner):
        self.chain = chain
        self.signer = signer
        self.ca_asn1 = asn1_x509.Certificate.load(chain[0].public_bytes(serialization.Encoding.DER))
        self._lock = threading.Lock()

    @classmethod
    def open(cls, chain: list[x509.Certificate], uri_text: str, home: Path) -> TokenIssuer:
        uri = Pkcs11Uri.parse(uri_text)
        if not uri.token or not (uri.object or uri.id):
            raise UserError("--issuing-ca-key pkcs11: URI needs token= and object= (or id=)")
        # The emulator's own run: one context for its lifetime, kept by the issuer.
        context = Pkcs11Context(home)
        session = tokens.session(context.library(uri.module_path), uri.token, _pin(uri))
        found = keys.private_keys(session, key_id=uri.id, label=uri.object)
        if len(found) != 1:
            raise UserError(f"--issuing-ca-key: expected one private key for {uri} on token "
                            f"{uri.token!r}, found {len(found)}")
        signer = TokenSigner(found[0], _spec(chain[0]))
        issuer = cls(chain, signer)
        issuer.context = context
        issuer._check_key()
        return issuer

    def issue(self, csr, registration_id, policy, now):
        public = asn1_keys.PublicKeyInfo.load(csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        with self._lock:
            leaf = certificates.issue(signer=self.signer, issuer=self.ca_asn1,
                                      subject_cn=registration_id, public_key=public,
                                      profile=certificates.LEAF_PROFILE,
                                      days=policy.validity_days, now=now)
        return [x509.load_der_x509_certificate(leaf.dump()), *self.chain]

    def _check_key(self) -> None:
        """A signature by the token key must verify with the certificate's key."""
        data = b"device-sim issuing CA key check"
        try:
            self.chain[0].public_key().verify(self.signer.sign(data), data,
                                              ec.ECDSA(getattr(hashes, self.signer.spec.hash_name.upper())()))
        except Exception:
            raise UserError("--issuing-ca-key: the token key is not the key of --issuing-ca-cert") from None


def _spec(ca_cert: x509.Certificate):
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _SPEC_BY_CURVE:
        raise UserError("--issuing-ca-key pkcs11: the issuing CA must have an EC P-256 or P-384 key")
    return key_spec(_SPEC_BY_CURVE[key.curve.name])


def _pin(uri: Pkcs11Uri) -> str:
    if uri.pin_value:
        return uri.pin_value
    if uri.pin_source:
        return pin_from_source(uri.pin_source)
    value = os.environ.get(ENV_USER_PIN)
    if not value:
        raise UserError("--issuing-ca-key pkcs11: no PIN: add ?pin-source=FILE to the URI or set "
                        f"${ENV_USER_PIN}")
    return value
