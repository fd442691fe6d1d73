"""What every component client shares: the channel, its options, and one-line errors.

StorageClient (sComponent) and MemoryClient (mComponent) build on this.
"""
from __future__ import annotations

import grpc

from legorun.errors import ComponentError

# Kept equal to legorun_components.common (MAX_MESSAGE, keepalive).
MAX_MESSAGE = 17 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_http_proxy", 0),
    # gRPC shares subchannels between all channels of a process by default,
    # so a fresh client would inherit another's reconnect backoff; and a
    # restarted component should be reachable again within a second.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _reason(err: grpc.RpcError) -> str:
    """A short lowercase reason from a gRPC error."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or ""
    low = details.lower()
    for needle, text in (("connection refused", "connection refused"),
                         ("no such file or directory", "no such socket (no such file or directory)"),
                         ("permission denied", "permission denied"),
                         ("socket closed", "connection closed"),
                         ("connection reset", "connection reset"),
                         ("broken pipe", "connection closed"),
                         ("keepalive", "no answer to keepalive pings"),
                         ("cancelling all calls", "server shut down")):
        if needle in low:
            return text
    name = code.name.lower().replace("_", " ") if code is not None else "rpc failed"
    details = " ".join(details.split())
    return f"{name}: {details}" if details else name


class ComponentClient:
    """A client of one component: a lazily made channel (TLS when a CA is
    given) and errors that name the component in one line."""

    METHOD_STATUS = ""  # the component's Status method, to ask why a connect failed

    def __init__(self, address: str, name: str, metadata: tuple, tls_ca: str | None) -> None:
        self.address = address
        self.name = name
        self._metadata = metadata or None
        self._tls_ca = tls_ca
        self._channel: grpc.Channel | None = None

    def _error(self, reason: str, code=None) -> ComponentError:
        return ComponentError(self.name, self.address, reason, code)

    def _get_channel(self) -> grpc.Channel:
        if self._channel is None:
            if self._tls_ca:
                try:
                    with open(self._tls_ca, "rb") as f:
                        ca = f.read()
                except OSError as e:
                    raise self._error(f"cannot read TLS CA {self._tls_ca}: {e.strerror}") from None
                creds = grpc.ssl_channel_credentials(root_certificates=ca)
                self._channel = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        return self._channel

    def status_bytes(self, timeout: float = 10.0) -> bytes:
        """The serialized reply of the component's Status call."""
        try:
            return self._get_channel().unary_unary(self.METHOD_STATUS)(
                b"", timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(_reason(e), e.code()) from None

    def connect(self, timeout: float = 5.0) -> None:
        """Wait until the channel is ready; raises ComponentError otherwise.
        (It does not check the token: the first call does.)"""
        channel = self._get_channel()
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            # Ask gRPC why: a fail-fast call reports the last connect error.
            reason = f"not ready after {timeout:g} s"
            try:
                channel.unary_unary(self.METHOD_STATUS)(b"", timeout=0.5, metadata=self._metadata,
                                                        wait_for_ready=False)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    reason = _reason(e)
            raise self._error(reason) from None
