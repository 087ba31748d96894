"""Optional TLS on the coordinator API: a worker with the CA joins and trains; plaintext is refused."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess

import grpc

from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import coordinator_pb2_grpc as cpb_grpc
from tests.swarm import BIN, Swarm, swarm_toml


def self_signed(tmp) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gptjt-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_coordinator(tmp_path):
    cert, key = self_signed(tmp_path)
    config = swarm_toml(tmp_path, steps=1, extra=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    swarm = Swarm(tmp_path, config)
    try:
        coordinator = swarm.start_coordinator()
        assert "(TLS)" in coordinator.text()
        with grpc.insecure_channel(swarm.address) as channel:  # plaintext cannot talk to it
            try:
                cpb_grpc.CoordinatorStub(channel).Status(cpb.StatusRequest(), timeout=3)
                raise AssertionError("a plaintext client was answered")
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        swarm.start_worker("a", None, "--tls-ca", cert)
        swarm.start_worker("b", None, "--tls-ca", cert)
        from gptjt_cli.swarm_commands import fetch_status

        import time
        deadline = time.monotonic() + 120
        while fetch_status(swarm.address, tls_ca=cert)["phase"] != "done":
            assert time.monotonic() < deadline, "TLS run did not finish"
            time.sleep(0.5)
        r = subprocess.run([str(BIN / "gptjt"), "status", "--coordinator", swarm.address, "--tls-ca", cert, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and '"phase": "done"' in r.stdout
    finally:
        swarm.close()
