"""``legorun status``: ask a running component what it holds and how it is.

Usage::

    legorun status ADDR [ADDR...] [--token T] [--tls-ca FILE] [--timeout SEC] [--json]

For each address it asks, over gRPC:

1. the standard health service (``grpc.health.v1.Health/Check``, service
   ""): SERVING, NOT_SERVING, ... ;
2. server reflection (``grpc.reflection.v1alpha.ServerReflection``) for the
   list of services, which tells the component's kind (a service in package
   ``legorun.storage.*`` is an sComponent, ``legorun.memory.*`` an
   mComponent) and, through the service's file descriptor, the shape of its
   ``Status`` reply;
3. that service's ``Status`` RPC, decoded with the descriptor reflection
   returned (so a component whose proto this legorun was not built with is
   still shown, field by field). Without reflection, the services whose
   protos legorun was built with are tried directly.

The human output is one block per component: kind, address, health, uptime,
the kind's own figures (sComponent: root, files, bytes, open clients, locks
held), then request counts by op. ``--json`` prints one JSON document:
``{"components": [{"address", "reachable", "health", "services", "kind",
"service", "status": {StatusReply fields}}, ...]}``.

Exit status: 0 every component answered and is SERVING; 1 one answered but
is not SERVING; 2 usage error, or a component cannot be reached (or refused
the token): one line on stderr naming it, no traceback.

Adding a component kind: put its package prefix in KINDS and, if the generic
rendering of its StatusReply is not enough, a ``rows(status) -> list`` of
(label, text) in DETAILS (see _storage_rows).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

USAGE = "legorun status ADDR [ADDR...] [--token T] [--tls-ca FILE] [--timeout SEC] [--json]"

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"

# Package prefix of a component's service -> the component's kind.
KINDS = {
    "legorun.storage.": "sComponent",
    "legorun.memory.": "mComponent",
}


class Unreachable(Exception):
    """One line for the user: the component cannot be asked."""


# --------------------------------------------------------------------------
# Formatting helpers (pure)
# --------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


def fmt_duration(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


def kind_of(service: str) -> str | None:
    for prefix, kind in KINDS.items():
        if service.startswith(prefix):
            return kind
    return None


def _storage_rows(st: dict) -> list:
    return [("root", st.get("root", "")),
            ("files", str(st.get("files", 0))),
            ("bytes", f"{fmt_bytes(st.get('bytes', 0))} ({st.get('bytes', 0)})"),
            ("open clients", str(st.get("open_clients", 0))),
            ("locks held", str(st.get("locks", 0)))]


def _memory_rows(st: dict) -> list:
    cap = st.get("capacity", 0)
    held = st.get("bytes", 0)
    share = f", {100 * held / cap:.1f}% of capacity" if cap else ""
    return [("capacity", f"{fmt_bytes(cap)} ({cap})" if cap else "unlimited"),
            ("held", f"{st.get('pages', 0)} pages, {fmt_bytes(held)}{share}"),
            ("spaces", str(st.get("spaces", 0))),
            ("clients", f"{st.get('clients', 0)} ({st.get('open_streams', 0)} open streams)")]


# kind -> rows(status dict) -> [(label, text)]; fields it names are not
# repeated by the generic rendering. Kinds without an entry (and fields
# not covered) are shown generically.
DETAILS: dict[str, Callable[[dict], list]] = {
    "sComponent": _storage_rows,
    "mComponent": _memory_rows,
}
DETAIL_FIELDS = {
    "sComponent": {"root", "files", "bytes", "open_clients", "locks"},
    "mComponent": {"capacity", "bytes", "pages", "spaces", "clients", "open_streams"},
}
# Shown by the common part of the block, for every kind.
COMMON_FIELDS = {"uptime_s", "requests", "requests_by_op"}


def _generic_rows(st: dict, skip: set) -> tuple[list, list]:
    """Scalars as (label, text) rows; lists of dicts (e.g. per-client spaces)
    and maps as sub-tables: (title, header, rows)."""
    rows, tables = [], []
    for key, value in st.items():
        if key in skip:
            continue
        label = key.replace("_", " ")
        if isinstance(value, dict):
            tables.append((label, ["name", "value"], [[k, _text(v)] for k, v in value.items()]))
        elif isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                header = []
                for v in value:
                    header += [k for k in v if k not in header]
                tables.append((label, header, [[_text(v.get(h, "")) for h in header] for v in value]))
            elif value:
                rows.append((label, ", ".join(_text(v) for v in value)))
            else:
                tables.append((label, [], []))
        else:
            if key.endswith("bytes") and isinstance(value, (int, float)):
                rows.append((label, f"{fmt_bytes(value)} ({value})"))
            else:
                rows.append((label, _text(value)))
    return rows, tables


def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _table(header: list, rows: list, indent: str) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    numeric = [all(str(r[i]).replace(".", "", 1).isdigit() for r in rows) and rows
               for i in range(len(header))]

    def line(cells):
        return indent + "  ".join(str(c).rjust(w) if numeric[i] else str(c).ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header)] + [line(r) for r in rows]


def render(result: dict) -> str:
    """The human block of one component (a dict as in the --json output)."""
    kind = result.get("kind") or "component"
    out = [f"{kind} at {result['address']}"]
    rows = [("health", result.get("health", "unknown"))]
    st = result.get("status")
    if result.get("service"):
        rows.append(("service", result["service"]))
    if st is None:
        rows.append(("status", result.get("status_error") or "no Status RPC"))
    else:
        if "uptime_s" in st:
            rows.append(("uptime", fmt_duration(st["uptime_s"])))
        detail = DETAILS.get(kind)
        skip = set(COMMON_FIELDS)
        if detail:
            rows += detail(st)
            skip |= DETAIL_FIELDS.get(kind, set())
        extra, tables = _generic_rows(st, skip | {"requests_by_op"})
        rows += extra
        if "requests" in st:
            rows.append(("requests", str(st["requests"])))
    width = max(len(r[0]) for r in rows)
    out += [f"  {label.ljust(width)}  {text}" for label, text in rows]
    if st is not None:
        by_op = st.get("requests_by_op") or {}
        if by_op:
            ops = sorted(by_op.items(), key=lambda kv: (-int(kv[1]), kv[0]))
            out += _table(["op", "requests"], [[k, str(v)] for k, v in ops], "    ")
        for title, header, trows in tables:
            out.append(f"  {title}:")
            out += _table(header, trows, "    ") if trows else ["    none"]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Talking to the component
# --------------------------------------------------------------------------

def normalize_address(text: str) -> str:
    """gRPC target forms pass through; a bare socket path becomes unix:PATH."""
    if text.startswith("unix:") or text.startswith("unix-abstract:"):
        return text
    if text.startswith("/") or text.startswith("./") or text.startswith("../"):
        return "unix:" + os.path.abspath(text)
    return text


def message_to_dict(msg) -> dict:
    """A protobuf message as plain JSON-able data, every field present
    (defaults included), integers kept as integers."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        mt = field.message_type
        if mt is not None and mt.GetOptions().map_entry:
            vfield = mt.fields_by_name["value"]
            if vfield.message_type is not None:
                out[field.name] = {str(k): message_to_dict(v) for k, v in value.items()}
            else:
                out[field.name] = {str(k): _scalar(v) for k, v in value.items()}
        elif _is_repeated(field):
            out[field.name] = [message_to_dict(v) if mt is not None else _scalar(v) for v in value]
        elif mt is not None:
            out[field.name] = message_to_dict(value)
        else:
            out[field.name] = _scalar(value)
    return out


def _is_repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)
    if rep is not None:
        return bool(rep)
    return field.label == field.LABEL_REPEATED


def _scalar(v):
    if isinstance(v, bytes):
        return v.hex()
    return v


class Asker:
    """One channel to one component, and the questions status asks."""

    def __init__(self, address: str, token: str | None, tls_ca: str | None, timeout: float):
        import grpc
        from legorun.storage_client import CHANNEL_OPTIONS
        self.grpc = grpc
        self.address = address
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls_ca:
            try:
                with open(tls_ca, "rb") as f:
                    ca = f.read()
            except OSError as e:
                raise Unreachable(f"cannot read TLS CA {tls_ca}: {e.strerror}") from None
            self.channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=ca), options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

    def close(self) -> None:
        self.channel.close()

    def _unreachable(self, err) -> Unreachable:
        from legorun.storage_client import _reason
        if err.code() == self.grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {self.timeout:g} s"
        elif err.code() == self.grpc.StatusCode.UNAUTHENTICATED:
            reason = "refused the token: " + (err.details() or "unauthenticated")
        else:
            reason = _reason(err)
        return Unreachable(f"component at {self.address}: {reason}")

    def unary(self, method: str, request: bytes) -> bytes:
        ident = lambda b: b  # noqa: E731
        return self.channel.unary_unary(method, request_serializer=ident,
                                        response_deserializer=ident)(
            request, timeout=self.timeout, metadata=self.metadata)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ...; "unknown (...)" without a health service.
        Raises Unreachable when the component cannot be reached at all."""
        from grpc_health.v1 import health_pb2
        grpc = self.grpc
        try:
            raw = self.unary(f"/{HEALTH_SERVICE}/Check",
                             health_pb2.HealthCheckRequest(service=service).SerializeToString())
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "unknown (no health service)"
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "unknown (service not registered with health)"
            raise self._unreachable(e) from None
        reply = health_pb2.HealthCheckResponse.FromString(raw)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _reflect(self, **request):
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        req = reflection_pb2.ServerReflectionRequest(**request)
        for reply in stub.ServerReflectionInfo(iter([req]), timeout=self.timeout,
                                               metadata=self.metadata):
            if reply.HasField("error_response"):
                raise LookupError(reply.error_response.error_message)
            return reply
        raise LookupError("empty reflection reply")

    def services(self) -> list | None:
        """Service names from reflection, or None when it is not served."""
        grpc = self.grpc
        try:
            reply = self._reflect(list_services="")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise self._unreachable(e) from None
        except LookupError:
            return None
        return [s.name for s in reply.list_services_response.service]

    def status_classes(self, service: str):
        """(request class, reply class) of service/Status, from reflection's
        descriptors; None when the service has no Status method."""
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        pool = descriptor_pool.DescriptorPool()
        added: set = set()

        def add(protos: list) -> None:
            parsed = [descriptor_pb2.FileDescriptorProto.FromString(p) for p in protos]
            by_name = {fd.name: fd for fd in parsed}

            def add_one(fd):
                if fd.name in added:
                    return
                for dep in fd.dependency:
                    if dep not in added:
                        if dep not in by_name:
                            more = self._reflect(file_by_filename=dep)
                            add(list(more.file_descriptor_response.file_descriptor_proto))
                        else:
                            add_one(by_name[dep])
                added.add(fd.name)
                pool.Add(fd)
            for fd in parsed:
                add_one(fd)

        reply = self._reflect(file_containing_symbol=service)
        add(list(reply.file_descriptor_response.file_descriptor_proto))
        sd = pool.FindServiceByName(service)
        method = sd.methods_by_name.get("Status")
        if method is None:
            return None
        get = getattr(message_factory, "GetMessageClass", None)
        if get is None:  # protobuf < 4.21
            factory = message_factory.MessageFactory(pool)
            get = factory.GetPrototype
        return get(method.input_type), get(method.output_type)

    def status(self, service: str, classes) -> dict:
        req_cls, reply_cls = classes
        raw = self.unary(f"/{service}/Status", req_cls().SerializeToString())
        return message_to_dict(reply_cls.FromString(raw))


def builtin_status_classes() -> dict:
    """Status classes of the protos this legorun was built with, for a
    component that does not serve reflection: service name -> classes."""
    out = {}
    for module in ("storage_pb2", "memory_pb2"):
        try:
            pb = __import__(f"legorun.proto.{module}", fromlist=["DESCRIPTOR"])
        except ImportError:
            continue
        for sd in pb.DESCRIPTOR.services_by_name.values():
            m = sd.methods_by_name.get("Status")
            if m is not None:
                out[sd.full_name] = (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
    return out


def ask(address: str, token: str | None = None, tls_ca: str | None = None,
        timeout: float = 5.0) -> list:
    """What the component(s) served at `address` say: a list of result dicts
    (one per component service found; usually one). Raises Unreachable."""
    asker = Asker(address, token, tls_ca, timeout)
    grpc = asker.grpc
    try:
        overall = asker.health("")
        services = asker.services()
        builtin = None
        if services is None:
            builtin = builtin_status_classes()
            candidates = list(builtin)
        else:
            candidates = [s for s in services
                          if not s.startswith("grpc.") and s != REFLECTION_SERVICE]
        results = []
        for service in candidates:
            res = {"address": address, "reachable": True, "health": overall,
                   "services": services, "kind": kind_of(service), "service": service,
                   "status": None}
            try:
                classes = builtin[service] if builtin is not None else asker.status_classes(service)
            except (LookupError, KeyError) as e:
                res["status_error"] = f"no descriptor from reflection: {e}"
                classes = None
            if classes is None and "status_error" not in res:
                res["status_error"] = "the service has no Status RPC"
            if classes is not None:
                try:
                    res["status"] = asker.status(service, classes)
                except grpc.RpcError as e:
                    if builtin is not None and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                        continue  # not this kind of component
                    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise asker._unreachable(e) from None
                    res["status_error"] = f"Status failed: {e.code().name.lower()}: {e.details()}"
            if service != "" and res["health"] == "SERVING":
                per = asker.health(service)
                if not per.startswith("unknown"):
                    res["health"] = per
            results.append(res)
        if not results:
            results.append({"address": address, "reachable": True, "health": overall,
                            "services": services, "kind": None, "service": None,
                            "status": None, "status_error": "no legorun component service found"})
        return results
    finally:
        asker.close()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legorun status", usage=USAGE,
        description="Ask running legorun components (sComponent, mComponent) for their health "
                    "and status: what they hold, uptime, requests served.",
        epilog="Exit status: 0 all SERVING, 1 a component answered but is not SERVING, "
               "2 a component cannot be reached or refused the token.")
    p.add_argument("addresses", nargs="+", metavar="ADDR",
                   help="unix:/path (or a socket path) or HOST:PORT")
    p.add_argument("--token", default=os.environ.get("LEGORUN_TOKEN"),
                   help="shared token for components on TCP (default: $LEGORUN_TOKEN)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate when the component serves TLS")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SEC",
                   help="seconds to wait for each answer (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    results, failed, blocks = [], False, []
    for text in args.addresses:
        address = normalize_address(text)
        try:
            found = ask(address, args.token, args.tls_ca, args.timeout)
        except Unreachable as e:
            print(f"legorun status: {e}", file=sys.stderr)
            failed = True
            results.append({"address": address, "reachable": False, "error": str(e)})
            continue
        results += found
        blocks += [render(r) for r in found]
    if args.json:
        json.dump({"components": results}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif blocks:
        print("\n\n".join(blocks))
    sys.stdout.flush()
    if failed:
        return 2
    return 0 if all(r.get("health") == "SERVING" for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
