"""The issuing CA of certificate issuance: generated in the state directory, or supplied.

Three sources (docs/certificate-issuance.md, "Emulator"):
- nothing given: `<home>/stub/issuing/ca.pem` (issuing CA, then its root) and `ca.key`,
  made on first start (EC P-384, as the public service's issuing CAs are) and kept;
- `--issuing-ca-cert FILE --issuing-ca-key FILE`: a PEM chain (issuing CA first, up to
  its root) and its unencrypted PEM key;
- `--issuing-ca-key 'pkcs11:...'`: the key stays in a PKCS#11 token, every leaf is
  signed there (stub/issuing_token.py).
Each returns a core `Issuer` (stub/core/issuance.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.common.x509util import CertificateError, ca_problem, load_certificate_file, to_pem
from device_sim.stub.core.issuance import Issuer, KeyIssuer
from device_sim.stub.layout import ISSUING_CA_CERT_FILE, ISSUING_CA_KEY_FILE, ISSUING_SUBDIR

CA_VALIDITY = dt.timedelta(days=3650)


def load_issuer(state_dir: Path, cert_file: Path | None, key: str | None) -> Issuer:
    """The issuer the options name (UserError naming the option at fault)."""
    if cert_file is None and key is None:
        return generated_issuer(state_dir / ISSUING_SUBDIR)
    if cert_file is None or key is None:
        raise UserError("--issuing-ca-cert and --issuing-ca-key go together (the key may be a "
                        "pkcs11: URI)")
    chain = _chain(cert_file)
    if key.lower().startswith("pkcs11:"):
        from device_sim.stub.issuing_token import TokenIssuer  # token work only when asked
        return TokenIssuer.open(chain, key, state_dir.parent)
    return KeyIssuer(chain, _file_key(Path(key), chain[0]))


def generated_issuer(directory: Path) -> Issuer:
    cert_path, key_path = directory / ISSUING_CA_CERT_FILE, directory / ISSUING_CA_KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_key, chain = _make_chain()
        write_atomic(key_path, ca_key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()), private=True)
        write_atomic(cert_path, to_pem(chain))
    chain = _chain(cert_path)
    return KeyIssuer(chain, _file_key(key_path, chain[0]))


def _chain(path: Path) -> list[x509.Certificate]:
    try:
        chain = load_certificate_file(path)
    except (OSError, CertificateError) as exc:
        raise UserError(f"--issuing-ca-cert {path}: {exc}") from None
    if not chain:
        raise UserError(f"--issuing-ca-cert {path} holds no certificate")
    problem = ca_problem(chain[0], 0)
    if problem:
        raise UserError(f"--issuing-ca-cert {path}: the first certificate {problem}; it must be "
                        "the issuing CA (its root may follow)")
    return chain


def _file_key(path: Path, ca_cert: x509.Certificate):
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"--issuing-ca-key {path}: not an unencrypted PEM private key "
                        f"({type(exc).__name__})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise UserError(f"--issuing-ca-key {path}: EC or RSA keys only")
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != ca_cert.public_key().public_bytes(*public):
        raise UserError(f"--issuing-ca-key {path} is not the key of the issuing CA certificate")
    return key


def _make_chain() -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    now = dt.datetime.now(dt.timezone.utc)
    root_key, issuing_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    root_name = _name("device-sim emulator credential root")
    root = _ca(root_name, root_name, root_key.public_key(), root_key, root_key.public_key(), now)
    issuing = _ca(_name("device-sim emulator issuing CA (policy default)"), root_name,
                  issuing_key.public_key(), root_key, root_key.public_key(), now, path_length=0)
    return issuing_key, [issuing, root]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "device-sim"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(subject, issuer, public_key, signing_key, issuer_public, now, path_length=None):
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),
                           critical=False)
            .sign(signing_key, hashes.SHA384()))
