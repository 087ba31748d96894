"""The coordinator: the run's ledger (SQLite), the stage plan, and the gRPC API workers join."""
