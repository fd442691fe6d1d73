"""What every component server shares: addresses, auth, TLS, health, serving.

A component (sComponent now, mComponent later) is a gRPC server started by
hand or by the launcher. The launcher waits for the single stdout line
``listening on ADDR``; every failure before that is one line on stderr and
exit status 2, never a traceback.

Addresses use gRPC's own target forms: ``unix:/path``, ``unix:///abs/path``,
``HOST:PORT`` and ``[IPV6]:PORT``. A Unix socket is protected by its file
mode (0600); TCP requires a shared token (``authorization: Bearer TOKEN``)
and may add TLS.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hmac
import logging
import os
import select
import signal
import socket
import stat
import sys
import threading
from typing import Callable, Iterable, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

TOKEN_ENV = "LEGORUN_TOKEN"
AUTH_HEADER = "authorization"
EXIT_USAGE = 2

# Largest payload of one request or reply (Read.length, Write.data), plus room
# for the message around it.
MAX_PAYLOAD = 16 * 1024 * 1024
MAX_MESSAGE = MAX_PAYLOAD + 1024 * 1024

# Clients (legorun.storage_client) send keepalive pings every 10 s so that a
# peer that vanished without closing its socket fails the stream instead of
# hanging it; the server must accept pings that often or it answers GOAWAY.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Two servers on one port must be an error, not a silent load balance.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)

class AddressError(ValueError):
    """An address that is not one of the accepted forms; str() is one line."""


@dataclasses.dataclass(frozen=True)
class Address:
    """A parsed listen/connect address.

    ``target`` is the canonical gRPC form (``unix:/abs/path`` or
    ``host:port`` with IPv6 hosts in brackets).
    """

    kind: str  # "unix" or "tcp"
    target: str
    path: str | None = None  # unix only, absolute
    host: str | None = None  # tcp only, without brackets
    port: int | None = None  # tcp only

    @property
    def is_tcp(self) -> bool:
        return self.kind == "tcp"


def parse_address(text: str) -> Address:
    """Parse ``unix:/path``, ``unix:///abs/path``, ``HOST:PORT``, ``[V6]:PORT``.

    A relative unix path (``unix:rel/sock``) is made absolute against the
    current directory. Raises AddressError.
    """
    if not text:
        raise AddressError("empty address")
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path.startswith("/"):
            raise AddressError(f"{text}: unix:// needs an absolute path (unix:///abs/path)")
        return _unix_address(text, path)
    if text.startswith("unix:"):
        return _unix_address(text, text[len("unix:"):])
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise AddressError(f"{text}: expected [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"{text}: expected unix:/path, HOST:PORT or [IPV6]:PORT")
        if ":" in host:
            raise AddressError(f"{text}: an IPv6 host must be in brackets: [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"{text}: bad port {port_text!r}")
    port = int(port_text)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Address(kind="tcp", target=target, host=host, port=port)


def _unix_address(text: str, path: str) -> Address:
    if not path:
        raise AddressError(f"{text}: empty socket path")
    if "\0" in path:
        raise AddressError(f"{text}: NUL byte in socket path")
    path = os.path.abspath(path)
    return Address(kind="unix", target=f"unix:{path}", path=path)


def is_tcp(addr: str | Address) -> bool:
    """True when the address is a TCP one (needs a token); raises AddressError."""
    if isinstance(addr, Address):
        return addr.is_tcp
    return parse_address(addr).is_tcp


def runtime_dir() -> str:
    """Where a component's default socket lives: $XDG_RUNTIME_DIR/legorun,
    else /tmp/legorun-$UID."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "legorun")
    return f"/tmp/legorun-{os.getuid()}"


def default_address(name: str) -> str:
    """``unix:RUNTIME_DIR/NAME.sock`` (see runtime_dir)."""
    return f"unix:{os.path.join(runtime_dir(), name + '.sock')}"


def resolve_token(token: str | None) -> str | None:
    """The token given on the command line, else $LEGORUN_TOKEN, else None."""
    if token:
        return token
    return os.environ.get(TOKEN_ENV) or None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries ``token`` (empty without one)."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks ``authorization: Bearer TOKEN``
    with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_HEADER:
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._expected):
                    return continuation(handler_call_details)
                return _refusing_handler(continuation(handler_call_details), "wrong token")
        return _refusing_handler(continuation(handler_call_details), "missing token")


def _refusing_handler(handler, why: str):
    if handler is None:
        return None

    def refuse(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{why}: send 'authorization: Bearer TOKEN'")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


_prog = "legorun"  # the component's command name, set by add_server_arguments


def die(message: str) -> NoReturn:
    """Print one line ``PROG: MESSAGE`` on stderr and exit with status 2."""
    print(f"{_prog}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def add_server_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add --listen, --token, --tls-cert, --tls-key (defaults for component NAME)."""
    global _prog
    _prog = parser.prog
    parser.add_argument(
        "--listen", metavar="ADDR", default=None,
        help=("where to listen: unix:/path, unix:///abs/path, HOST:PORT or [IPV6]:PORT "
              f"(default: unix:$XDG_RUNTIME_DIR/legorun/{name}.sock, or "
              f"unix:/tmp/legorun-$UID/{name}.sock without XDG_RUNTIME_DIR; "
              f"here {default_address(name)})"))
    parser.add_argument(
        "--token", metavar="T", default=None,
        help=f"shared secret clients must send on TCP (default: ${TOKEN_ENV}); "
             "required for a TCP listen address")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when the process that started this one dies "
                             "(legorun uses it for the components it embeds)")


def exit_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent dies (even by SIGKILL)."""
    import ctypes
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        sys.exit(0)


@dataclasses.dataclass
class ServerConfig:
    """What serve() needs; build it with server_config_from_args()."""

    address: Address
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def server_config_from_args(args: argparse.Namespace, name: str) -> ServerConfig:
    """Validate the common arguments; exits 2 with one line on a problem."""
    if getattr(args, "exit_with_parent", False):
        exit_with_parent()
    try:
        address = parse_address(args.listen or default_address(name))
    except AddressError as e:
        die(f"bad --listen address: {e}")
    token = resolve_token(args.token)
    if address.is_tcp and not token:
        die(f"refusing to listen on TCP {address.target} without a token: "
            f"pass --token or set {TOKEN_ENV}")
    if bool(args.tls_cert) != bool(args.tls_key):
        die("--tls-cert and --tls-key go together")
    if args.tls_cert and not address.is_tcp:
        die("TLS is for TCP addresses; a unix socket is protected by its file mode")
    return ServerConfig(address=address, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        die(f"cannot read {what} {path}: {e.strerror}")


def _try_bind(address: Address) -> None:
    """Bind (and release) the address ourselves first: gRPC's bind failure
    is a RuntimeError without the reason plus a log line on stderr, and we
    owe the user one line with the reason. Exits 2 on failure."""
    try:
        if address.kind == "unix":
            fam, where = socket.AF_UNIX, address.path
        else:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            fam, where = infos[0][0], infos[0][4]
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            if fam != socket.AF_UNIX:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            s.bind(where)
        if address.kind == "unix":
            os.unlink(address.path)
    except socket.gaierror as e:
        die(f"cannot listen on {address.target}: {e.strerror}")
    except OSError as e:
        die(f"cannot listen on {address.target}: {(e.strerror or str(e)).lower()}")


def _prepare_unix_path(address: Address) -> None:
    """Create the socket's directory (0700 when we make it) and refuse to
    steal the path from a live server (gRPC would unlink it silently)."""
    parent = os.path.dirname(address.path)
    if parent == runtime_dir():
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as e:
            die(f"cannot listen on {address.target}: cannot create {parent}: {e.strerror}")
    try:
        st = os.lstat(address.path)
    except FileNotFoundError:
        return
    except OSError as e:
        die(f"cannot listen on {address.target}: {e.strerror}")
    if not stat.S_ISSOCK(st.st_mode):
        die(f"cannot listen on {address.target}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(address.path)
        except OSError:
            pass
        else:
            die(f"cannot listen on {address.target}: address already in use "
                "(another server is listening)")
    try:
        os.unlink(address.path)  # the stale socket of a dead server
    except OSError as e:
        die(f"cannot listen on {address.target}: cannot remove stale socket: {e.strerror}")


def serve(
    config: ServerConfig,
    register: Callable[[grpc.Server], Iterable[str]],
    *,
    max_workers: int = 64,
    on_ready: Callable[[], None] | None = None,
    stop_event: threading.Event | None = None,
    options: Iterable[tuple[str, object]] = (),
) -> int:
    """Run a component server until SIGTERM/SIGINT (or ``stop_event``); returns 0.

    ``register(server)`` adds the component's servicers and returns their
    full service names (for health and reflection). Health (status SERVING)
    and reflection are added here. Prints exactly one stdout line
    ``listening on ADDR`` once the server accepts connections. Bind
    failures exit 2 with one line on stderr. ``options`` are extra gRPC
    server options (keys not already in SERVER_OPTIONS).
    """
    interceptors = [TokenAuthInterceptor(config.token)] if config.token else []
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=SERVER_OPTIONS + tuple(options),
    )
    names = list(register(server))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)

    address = config.address
    if address.kind == "unix":
        _prepare_unix_path(address)
    _try_bind(address)
    if config.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(_read_file(config.tls_key, "TLS key"), _read_file(config.tls_cert, "TLS certificate"))])
    old_umask = os.umask(0o177)  # the socket file is born 0600
    try:
        if config.tls_cert:
            port = server.add_secure_port(address.target, creds)
        else:
            port = server.add_insecure_port(address.target)
    except RuntimeError:
        port = 0
    finally:
        os.umask(old_umask)
    if port == 0:
        die(f"cannot listen on {address.target}: bind failed")
    if address.kind == "unix":
        try:
            os.chmod(address.path, 0o600)
        except OSError as e:
            die(f"cannot listen on {address.target}: {e.strerror}")
        shown = address.target
    else:
        shown = f"[{address.host}]:{port}" if ":" in address.host else f"{address.host}:{port}"

    stop = stop_event or threading.Event()
    # SIGTERM/SIGINT only write to a pipe (signal.set_wakeup_fd): a handler
    # that set a threading.Event took the Event's lock inside the main
    # thread's own wait on it, and a server so signalled (its parent's death
    # signal, then a kill) could hang for good
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, frame: None)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    try:
        server.start()
        for service in ["", *names]:
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        if on_ready:
            on_ready()
        print(f"listening on {shown}", flush=True)
        while not stop.is_set():  # (a stop_event may be set by another thread)
            if select.select([wake_r], [], [], 0.5)[0]:
                break
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=1.0).wait()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
        if address.kind == "unix":
            try:
                os.unlink(address.path)
            except OSError:
                pass
    return 0
