"""This worker's identity on stage links: its key, the certificate the run's CA signed for it, mutual TLS.

The key is made here and never leaves the process; Join sends its public half and gets back a
certificate whose common name is the worker id (gptjt_core/pki.py). The stage server starts
before Join (Join must name its address), so it serves a placeholder certificate until the
real one arrives (grpc's dynamic server credentials ask for the current one at every
handshake); nobody can complete a handshake before that, since nothing the run's CA signed
matches the placeholder. Callers are identified by the common name of the certificate they
present (`caller_identity`); servers are checked against the worker id the coordinator says
serves that address (`target_name`).
"""

from __future__ import annotations

import socket

import grpc

from gptjt_core.pki import WORKER_SAN_SUFFIX, new_ca, new_key_pem, public_key_pem


class StageIdentity:
    def __init__(self, key_pem: bytes | None = None):
        self.key_pem = key_pem or new_key_pem()
        self.cert_pem: bytes | None = None
        self.ca_pem: bytes | None = None
        self._served = False  # the real certificate was handed to the server's credentials

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.key_pem).decode()

    def adopt(self, ca_pem: str, cert_pem: str) -> None:
        """The certificate and CA the coordinator returned at Join."""
        self.ca_pem, self.cert_pem = ca_pem.encode(), cert_pem.encode()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS for the stage server: a placeholder until `adopt`, then the real certificate;
        every client must present a certificate the run's CA signed."""
        placeholder_key, placeholder_cert = new_ca("gptjt worker before its join")
        initial = grpc.ssl_server_certificate_configuration([(placeholder_key, placeholder_cert)],
                                                            root_certificates=placeholder_cert)

        def current():
            if self.cert_pem is None or self._served:
                return None  # keep what the server has
            self._served = True
            return grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)],
                                                             root_certificates=self.ca_pem)

        return grpc.dynamic_ssl_server_credentials(initial, current, require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self.cert_pem is None:
            raise RuntimeError("this worker has no stage-link certificate yet (it has not joined)")
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


async def serve_stage(listen: str, servicer, identity: StageIdentity | None, options: list) -> grpc.aio.Server:
    """Start the Stage server on `listen` (the reserved port): mutual TLS with `identity`'s
    certificate, or plaintext when identity is None (link.tls "off")."""
    from gptjt_proto import stage_pb2_grpc
    from gptjt_proto.malformed import MalformedRequests

    server = grpc.aio.server(interceptors=[MalformedRequests()], options=options)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    if identity is not None:
        if identity.cert_pem is None:
            raise RuntimeError("the coordinator sent no stage-link certificate although the run's links are TLS")
        port = server.add_secure_port(listen, identity.server_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"--listen {listen}: cannot bind (address in use or not local)")
    await server.start()
    return server


def target_name(worker_id: str) -> str:
    """The name a worker's certificate carries: the TLS target a caller checks the server against."""
    return worker_id + WORKER_SAN_SUFFIX


def caller_identity(context) -> str:
    """The common name of the certificate the caller presented ("" on a plaintext link)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


class PortReservation:
    """A port held for the stage server between Join (which must name the address) and the
    server's start (which needs the run's TLS setting from the Join reply). SO_REUSEPORT on both
    this socket and gRPC's lets the server bind it while it is held, so no other process can
    take it in between."""

    def __init__(self, host: str, port: int = 0):
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self._sock.bind((host.strip("[]"), port))
        except OSError as e:
            self._sock.close()
            raise RuntimeError(f"--listen {host}:{port}: cannot bind ({e.strerror}); choose another address") from None
        self.port = self._sock.getsockname()[1]

    def listen(self) -> None:
        """Accept connections (into the backlog) before the server starts: a reachability check
        from outside can then complete its TCP handshake."""
        self._sock.listen(8)

    def release(self) -> None:
        self._sock.close()
