"""Operator actions for the gRPC Operator API and the dashboard: admin token check, then one ledger call."""

from __future__ import annotations

import json
import logging
import secrets

import grpc

from gptjt_proto import operator_pb2 as opb
from gptjt_proto import operator_pb2_grpc as opb_grpc

from .admin_token import AdminToken, Unauthorized
from .ledger import OperatorError

log = logging.getLogger(__name__)

_GRPC_CODES = {"not_found": grpc.StatusCode.NOT_FOUND, "precondition": grpc.StatusCode.FAILED_PRECONDITION,
               "invalid": grpc.StatusCode.INVALID_ARGUMENT}


ACTIONS = ("drain", "pause", "resume", "token-create", "token-revoke", "token-revoke-and-end-sessions",
           "quarantine-lift")


class OperatorActions:
    """The admin actions, run on the coordinator's event loop (where the ledger lives)."""

    def __init__(self, ledger, coordinator_service, admin: AdminToken, ca=None):
        self.ledger = ledger
        self.coordinator = coordinator_service  # notified after a change, so Watch streams push it
        self.admin = admin
        self.ca = ca  # coordinator/run_ca.py RunCA: certificates for the operator's tools

    async def perform(self, action: str, admin_token: str, arg: str = "") -> dict:
        """Raises Unauthorized, or OperatorError (unknown action, bad argument, unknown id)."""
        if action not in ACTIONS:
            raise OperatorError(f"no admin action {action!r}; actions: {', '.join(ACTIONS)}", "not_found")
        do = {"drain": lambda: self.ledger.request_drain(arg),
              "pause": lambda: self.ledger.set_paused(True),
              "resume": lambda: self.ledger.set_paused(False),
              "token-create": self.ledger.create_token,
              "token-revoke": lambda: self.ledger.revoke_token(arg),
              "token-revoke-and-end-sessions": lambda: self.ledger.revoke_token(arg, end_sessions=True),
              "quarantine-lift": lambda: self.ledger.lift_quarantine(arg)}[action]
        self.admin.check(admin_token)
        result = do()
        log.info("operator: %s %s", action, arg if not action.startswith("token-revoke") else "")
        await self.coordinator.notify()
        return result


class OperatorService(opb_grpc.OperatorServicer):
    """gRPC adapter: errors become status codes whose message says what to do."""

    def __init__(self, actions: OperatorActions):
        self.actions = actions

    async def _act(self, context, action: str, admin_token: str, arg: str = "") -> opb.OperatorReply:
        try:
            result = await self.actions.perform(action, admin_token, arg)
        except Unauthorized as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except OperatorError as e:
            await context.abort(_GRPC_CODES[e.code], str(e))
        return opb.OperatorReply(json=json.dumps(result))

    async def Drain(self, request, context):
        return await self._act(context, "drain", request.admin_token, request.worker)

    async def LiftQuarantine(self, request, context):
        return await self._act(context, "quarantine-lift", request.admin_token, request.worker)

    async def SetPaused(self, request, context):
        return await self._act(context, "pause" if request.paused else "resume", request.admin_token)

    async def CreateToken(self, request, context):
        return await self._act(context, "token-create", request.admin_token)

    async def RevokeToken(self, request, context):
        action = "token-revoke-and-end-sessions" if request.end_sessions else "token-revoke"
        return await self._act(context, action, request.admin_token, request.token)

    async def OperatorCertificate(self, request, context):
        """A stage-link client certificate for the operator's tools (gptjt export from the swarm)."""
        try:
            self.actions.admin.check(request.admin_token)
            cert = self.actions.ca.issue(f"operator-{secrets.token_hex(4)}", request.public_key_pem.encode())
        except Unauthorized as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"public_key_pem: {e}")
        return opb.OperatorCertificateReply(ca_pem=self.actions.ca.cert_pem.decode(), cert_pem=cert.decode())

    async def Events(self, request, context):
        try:
            events = self.actions.ledger.events.query(request.after_id, request.limit, request.kind)
        except OperatorError as e:
            await context.abort(_GRPC_CODES[e.code], str(e))
        return opb.EventsReply(json=json.dumps({"events": events}))
