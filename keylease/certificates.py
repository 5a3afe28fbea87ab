"""What both programs need when they read an X.509 certificate that a stranger may have crafted.

``MALFORMED`` is what the ``cryptography`` package raises for a crafted certificate's parts,
found by ``scripts/fuzz.py``: a malformed name or extension raises ValueError, a name attribute
of the BitString type under another OID raises TypeError, an X.509 version other than 1 and 3
raises InvalidVersion (which is no ValueError), a duplicate extension or an x400Address name
their own classes. Every parser of a certificate from a node, a file or the wire catches all of
them (the broker's EK certificates, the agent's release-signing certificates).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["MALFORMED", "ec_public_key"]

MALFORMED = (
    ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)  # fmt: skip


def ec_public_key(der: bytes) -> ec.EllipticCurvePublicKey | None:
    """The EC public key of the DER certificate ``der``; None if it is malformed or not EC."""
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except MALFORMED:
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None
