"""The run's ledger over SQLite: one module per concept, composed over one connection by RunLedger.

  db            the connection, transactions, meta, the clock       schema   tables and upgrades
  step_state    where the run stands (step, attempt, phase, members, restore epoch)
  tokens        join tokens           workers       the registry    measurements  devices, links
  tickets       micro-batches, exactly-once audit                   reports  the members' reports
  history       closed steps          checkpoints   the store's index         events   the event log
  rules         pure: judging contributions, replica agreement, norms
  steps         the step protocol     recovery      deaths, restores, rollbacks
  planning      the stage plan        liveness_guard  stuck phases and their remedies
  assignments, status   read-only views; operator_requests  pause, drain
  run_ledger    the facade the server calls

The step machine (steps, recovery) calls the stores, which return facts and never call back.
"""

from .assignments import standby_view
from .commitments import Submitted
from .db import ALIVE_STATES
from .errors import LedgerError, OperatorError
from .events import EVENT_CATEGORIES, event_category
from .run_fingerprint import run_fingerprint
from .run_ledger import RunLedger
from .step_state import ACCUMULATED, APPLYING, AVERAGING, DONE, OPEN, WAITING
from .tickets import TicketRow, count_tickets
from .tokens import create_token_in, hash_token, revoke_token_in, token_id

__all__ = ["ACCUMULATED", "ALIVE_STATES", "APPLYING", "AVERAGING", "DONE", "EVENT_CATEGORIES", "LedgerError", "OPEN",
           "OperatorError", "RunLedger", "Submitted", "TicketRow", "WAITING", "count_tickets", "create_token_in",
           "event_category", "hash_token", "revoke_token_in", "run_fingerprint", "standby_view",
           "token_id"]
