"""The compat tests share the RPC tests' private broker."""

from tests.rpc.conftest import broker

__all__ = ["broker"]
