"""Crafted X.509 certificates for the parser tests: a real certificate's TBS rewritten at the DER
level (what ``cryptography``'s builder refuses to make) and signed again with the issuer's key.

- ``duplicate_extension``: the first extension twice;
- ``x400_san``: a subjectAltName holding an x400Address (a name form ``cryptography`` cannot
  represent);
- ``malformed_issuer``: an issuer name whose one attribute is UTF8String with invalid UTF-8.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

__all__ = ["duplicate_extension", "malformed_issuer", "x400_san"]

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_SAN_OID = bytes([0x06, 0x03, 0x55, 0x1D, 0x11])


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    """(tag, content, rest) of the first TLV in ``data``."""
    tag, n, offset = data[0], data[1], 2
    if n & 0x80:
        width = n & 0x7F
        n, offset = int.from_bytes(data[2 : 2 + width], "big"), 2 + width
    return tag, data[offset : offset + n], data[offset + n :]


def _children(content: bytes) -> list[bytes]:
    out = []
    while content:
        _, _, rest = _split(content)
        out.append(content[: len(content) - len(rest)])
        content = rest
    return out


def _parts(cert: x509.Certificate) -> tuple[list[bytes], bytes]:
    """The TBS's fields (version, serial, sigAlg, issuer, validity, subject, spki, [3] exts)
    and the outer signature algorithm."""
    _, body, _ = _split(cert.public_bytes(serialization.Encoding.DER))
    tbs, algorithm, _signature = _children(body)
    _, fields, _ = _split(tbs)
    return _children(fields), algorithm


def _signed(fields: list[bytes], algorithm: bytes, key: Key) -> bytes:
    tbs = _tlv(0x30, b"".join(fields))
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


def _extensions(fields: list[bytes]) -> list[bytes]:
    _, wrapped, _ = _split(fields[7])
    _, sequence, _ = _split(wrapped)
    return _children(sequence)


def _with_extensions(fields: list[bytes], extensions: list[bytes]) -> list[bytes]:
    return [*fields[:7], _tlv(0xA3, _tlv(0x30, b"".join(extensions)))]


def duplicate_extension(cert: x509.Certificate, key: Key) -> bytes:
    fields, algorithm = _parts(cert)
    extensions = _extensions(fields)
    return _signed(_with_extensions(fields, [*extensions, extensions[0]]), algorithm, key)


def x400_san(cert: x509.Certificate, key: Key) -> bytes:
    fields, algorithm = _parts(cert)
    kept = [e for e in _extensions(fields) if _SAN_OID not in e[:12]]
    names = _tlv(0x30, _tlv(0xA3, _tlv(0x30, b"")))  # GeneralNames { x400Address [3] {} }
    san = _tlv(0x30, _SAN_OID + _tlv(0x01, b"\xff") + _tlv(0x04, names))
    return _signed(_with_extensions(fields, [*kept, san]), algorithm, key)


def malformed_issuer(cert: x509.Certificate, key: Key) -> bytes:
    fields, algorithm = _parts(cert)
    common_name = _tlv(0x06, bytes([0x55, 0x04, 0x03]))
    issuer = _tlv(0x30, _tlv(0x31, _tlv(0x30, common_name + _tlv(0x0C, b"\xff\xfe"))))
    return _signed([*fields[:3], issuer, *fields[4:]], algorithm, key)
