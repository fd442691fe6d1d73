"""Generated gRPC modules (built from protos/ by setup.py; not committed).

`storage` is a lazy handle on storage_pb2: a run that never touches a mount
never pays for importing protobuf.
"""
import importlib


class _Lazy:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module = None

    def __getattr__(self, attr):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)


storage = _Lazy("legorun.proto.storage_pb2")
