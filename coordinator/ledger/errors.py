"""What the ledger refuses, and why, in words an operator or a test can act on."""

from __future__ import annotations


class LedgerError(RuntimeError):
    """The ledger file belongs to another run, or a request contradicts the ledger."""


class OperatorError(ValueError):
    """An operator request the run cannot carry out; `code` says why (and picks the exit code)."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code  # "not_found" | "precondition" | "invalid"
