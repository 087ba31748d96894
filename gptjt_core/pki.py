"""The run's small public-key infrastructure, as pure functions over PEM bytes (no files, no network).

The coordinator is the run's certificate authority: it signs, at Join, a short certificate
for the key each worker made for itself (the key never leaves the worker). Stage links are
mutual TLS: each side presents its certificate, checks the other's against the run's CA, and
reads the other's identity from the common name (a worker id, or "operator-..." for the
operator's tools). Identity is the certificate, not the IP, so a host may change address.
Keys are EC P-256 (fast handshakes, short certificates).
"""

from __future__ import annotations

import datetime

WORKER_SAN_SUFFIX = ".gptjt"  # a worker's certificate names it `<worker id>.gptjt` (the TLS target name)


def new_key_pem() -> bytes:
    """A fresh EC P-256 private key (PKCS8 PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def new_ca(name: str, days: float = 3650.0) -> tuple[bytes, bytes]:
    """(key PEM, self-signed CA certificate PEM) for a run."""
    key_pem = new_key_pem()
    cert = _build(name, public_key_pem(key_pem), name, key_pem, days, ca=True, dns=())
    return key_pem, cert


def issue(ca_key_pem: bytes, ca_cert_pem: bytes, subject: str, subject_public_key_pem: bytes,
          days: float) -> bytes:
    """A certificate for `subject` (a worker id, or operator-...) over its public key, signed by the CA.
    Raises ValueError if the public key is not a PEM public key."""
    from cryptography import x509

    issuer = x509.load_pem_x509_certificate(ca_cert_pem).subject.rfc4514_string().removeprefix("CN=")
    return _build(subject, subject_public_key_pem, issuer, ca_key_pem, days, ca=False,
                  dns=(subject + WORKER_SAN_SUFFIX,))


def common_name(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _build(subject: str, public_pem: bytes, issuer: str, issuer_key_pem: bytes, days: float, ca: bool,
           dns: tuple[str, ...]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    try:
        public = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key ({e}); send the public half of an EC or RSA key") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(public).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=10))  # clocks of volunteers drift
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    key = serialization.load_pem_private_key(issuer_key_pem, password=None)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
