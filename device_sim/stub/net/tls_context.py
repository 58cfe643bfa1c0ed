"""pyOpenSSL contexts for the emulator's TLS ports, and the client chain as it was sent.

Why pyOpenSSL and not the `ssl` module: DPS answers an unknown or missing client certificate
with HTTP 401 / errorCode 401002, not with a TLS alert, so the server must accept any chain
at the TLS layer and hand the application the chain the device actually sent. CPython's
`ssl` can neither accept an unverifiable chain nor return the presented intermediates.
"""

from __future__ import annotations

from cryptography import x509
from OpenSSL import SSL, crypto

from device_sim.common.x509util import is_self_signed, load_certificate_file
from device_sim.stub.net.server_pki import ServerIdentity


def _accept_any_chain(conn, cert, errno, depth, ok) -> bool:
    # The decision engine judges the chain after the handshake and answers with a DPS error;
    # the TLS layer must not reject anything, or the device would see an alert instead.
    return True


def _base_context(identity: ServerIdentity) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(str(identity.cert))
    context.use_privatekey_file(str(identity.key))
    context.check_privatekey()
    if identity.chain is not None:
        _add_chain(context, identity)
    # No session resumption: a resumed session carries no peer chain, and every connection
    # must show the emulator the chain the device presents now.
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def _add_chain(context: SSL.Context, identity: ServerIdentity) -> None:
    # Intermediates from a supplied chain file follow the leaf; the root is left out, as
    # clients must already hold it, and so is what the certificate file itself carries.
    sent = load_certificate_file(identity.cert)
    for cert in load_certificate_file(identity.chain):
        if cert not in sent and not is_self_signed(cert):
            context.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
            sent.append(cert)


def device_context(identity: ServerIdentity) -> SSL.Context:
    """Context for device ports: asks every client for a certificate and accepts any chain
    (or none); `presented_chain` then returns what was sent."""
    context = _base_context(identity)
    context.set_verify(SSL.VERIFY_PEER, _accept_any_chain)
    # OpenSSL's own chain check is thrown away (the callback accepts everything) but still
    # costs a signature verification per link, ~0.3 ms per handshake. Depth 0 stops its
    # chain building at the leaf. The decision engine checks every link of the chain as
    # presented; the peer chain OpenSSL keeps is the one received, whatever the depth, and
    # the client's CertificateVerify (proof of the leaf key) is checked regardless.
    context.set_verify_depth(0)
    return context


def service_context(identity: ServerIdentity) -> SSL.Context:
    """Context for the service API: server authentication only (callers use SAS tokens)."""
    return _base_context(identity)


class UnreadablePeerChain(ValueError):
    """The client sent a certificate that passed the TLS layer but cannot be decoded; DPS
    answers such a device as it answers an unknown certificate (docs/x509-rules.md)."""


def presented_chain(conn: SSL.Connection) -> list[x509.Certificate]:
    """The client's chain as sent: leaf first, then the extra certificates in wire order.

    OpenSSL's SSL_get_peer_cert_chain() leaves the leaf out on the server side, so it is
    put in front here; if a build ever returns it included, it is not duplicated.
    """
    try:
        leaf = conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return []
        rest = conn.get_peer_cert_chain(as_cryptography=True) or []
    except Exception as exc:  # cryptography refuses some DER OpenSSL accepted (e.g. version 5)
        raise UnreadablePeerChain(f"{type(exc).__name__}: {exc}") from None
    if rest and rest[0] == leaf:
        return list(rest)
    return [leaf, *rest]
