"""Errors that cross layers (kept free of heavy imports: grpc loads only when needed)."""
from __future__ import annotations


class ComponentError(Exception):
    """The component cannot be reached, refused us, or died.

    str() is one line: "sComponent at unix:/tmp/x.sock: connection refused".
    ``code`` is the grpc.StatusCode when gRPC gave one.
    """

    def __init__(self, name: str, address: str, reason: str, code=None):
        super().__init__(f"{name} at {address}: {reason}")
        self.name = name
        self.address = address
        self.reason = reason
        self.code = code


class FatalError(Exception):
    """legorun must stop: a component cannot be reached (exit status 2)."""


class MemoryLost(FatalError):
    """The guest's memory cannot be served (mComponent gone or full): the guest
    is killed as the OOM killer would, and legorun exits 137."""
