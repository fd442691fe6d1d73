"""`legorun status` against real component processes, and `legorun report` on
the JSON written by real runs of legorun and legorun bench."""
from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import legorun, start_scomponent

PY = sys.executable
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tool(name: str, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Run legorun.<name>.main(args) in a fresh interpreter (until `legorun NAME` is wired)."""
    code = f"import sys; from legorun import {name}; sys.exit({name}.main(sys.argv[1:]))"
    return subprocess.run([PY, "-c", code, *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)


def status_json(address: str, *extra) -> dict:
    p = tool("status", address, "--json", *extra)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    (comp,) = doc["components"]
    return comp


def one_line_failure(p: subprocess.CompletedProcess, *needles) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- status

def test_status_shows_the_scomponent_and_its_counts_grow_after_a_guest(scomponent):
    p = tool("status", scomponent.address)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.splitlines()[0] == f"sComponent at {scomponent.address}"
    for label in ("health", "uptime", "root", "files", "bytes", "open clients", "locks held",
                  "requests"):
        assert f"  {label} " in out, out
    assert "SERVING" in out and scomponent.root in out

    before = status_json(scomponent.address)
    assert before["kind"] == "sComponent"
    assert before["service"] == "legorun.storage.v1.Storage"
    assert before["health"] == "SERVING"
    assert "grpc.health.v1.Health" in before["services"]
    st0 = before["status"]
    assert st0["files"] == 0 and st0["bytes"] == 0 and st0["open_clients"] == 0
    assert os.path.realpath(st0["root"]) == os.path.realpath(scomponent.root)

    script = ("import os\nos.makedirs('/lego/d', exist_ok=True)\n"
              "for i in range(3):\n"
              "    with open(f'/lego/d/f{i}', 'w') as f: f.write('x' * (100 + i))\n"
              "print(sorted(os.listdir('/lego/d')))\n")
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['f0', 'f1', 'f2']"

    after = status_json(scomponent.address)["status"]
    assert after["files"] == 3
    assert after["bytes"] == 100 + 101 + 102
    assert after["requests"] > st0["requests"]
    assert after["uptime_s"] > st0["uptime_s"]
    ops = after["requests_by_op"]
    assert ops.get("open", 0) - st0["requests_by_op"].get("open", 0) >= 3
    assert sum(ops.values()) == after["requests"]

    # the human table lists the ops, most requested first, with their counts
    out = tool("status", scomponent.address).stdout
    assert "files         3" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("    ")][1:]
    counts = {op: int(n) for op, n in rows if n.isdigit()}
    assert counts["open"] >= 3
    assert list(counts.values()) == sorted(counts.values(), reverse=True)


def test_status_counts_an_open_client_while_a_guest_runs(scomponent):
    script = ("import sys\nopen('/lego/held', 'w').write('hi')\n"
              "print('ready', flush=True)\nsys.stdin.read()\n")
    guest = subprocess.Popen([PY, "-m", "legorun", "--storage", scomponent.address, "--", PY, "-c",
                              script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert guest.stdout.readline() == "ready\n"
        assert status_json(scomponent.address)["status"]["open_clients"] >= 1
    finally:
        guest.stdin.close()
        assert guest.wait(60) == 0
    deadline = time.monotonic() + 15
    while status_json(scomponent.address)["status"]["open_clients"] != 0:
        assert time.monotonic() < deadline, "the guest's stream is still counted after it exited"
        time.sleep(0.2)


def test_status_of_an_address_nobody_serves_is_one_line_and_exit_2(tmp_path):
    missing = f"unix:{tmp_path}/nobody.sock"
    one_line_failure(tool("status", missing), missing)
    # also a bare socket path, and --json: still one line on stderr, nothing on stdout
    p = tool("status", f"{tmp_path}/nobody.sock", "--json")
    one_line_failure(p, "nobody.sock")
    assert json.loads(p.stdout)["components"][0]["reachable"] is False


def test_status_of_a_component_that_died_is_one_line_and_exit_2(tmp_path):
    server = start_scomponent(tmp_path, "dead")
    assert tool("status", server.address).returncode == 0
    server.kill()
    one_line_failure(tool("status", server.address, "--timeout", "3"), server.address)


def test_status_over_tcp_needs_the_token(tmp_path):
    proc = subprocess.Popen(
        [PY, "-m", "legorun_components.scomponent", "--listen", "127.0.0.1:0",
         "--root", str(tmp_path / "root"), "--token", "s3cret"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), proc.stderr.read()
        address = line.split()[-1]
        env = {k: v for k, v in os.environ.items() if k != "LEGORUN_TOKEN"}
        one_line_failure(tool("status", address, env=env), address, "token")
        one_line_failure(tool("status", address, "--token", "wrong", env=env), "token")
        p = tool("status", address, "--token", "s3cret", env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(f"sComponent at {address}\n") and "SERVING" in p.stdout
        p = tool("status", address, env={**env, "LEGORUN_TOKEN": "s3cret"})
        assert p.returncode == 0, p.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_status_without_reflection_tries_the_services_it_knows(scomponent, monkeypatch):
    from legorun import status
    monkeypatch.setattr(status.Asker, "services", lambda self: None)
    (res,) = status.ask(scomponent.address)
    assert res["kind"] == "sComponent" and res["health"] == "SERVING"
    assert os.path.realpath(res["status"]["root"]) == os.path.realpath(scomponent.root)


def test_status_shows_an_mcomponent_space_appear_and_disappear(tmp_path):
    pytest.importorskip("legorun_components.mcomponent")
    from legorun.memory_client import MemoryClient
    address = f"unix:{tmp_path}/m.sock"
    proc = subprocess.Popen([PY, "-m", "legorun_components.mcomponent", "--listen", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().startswith("listening on"), proc.stderr.read()
        comp = status_json(address)
        assert comp["kind"] == "mComponent" and comp["health"] == "SERVING"
        assert comp["status"]["spaces"] == 0
        client = MemoryClient(address)
        try:
            space = client.create_space()
            st = status_json(address)["status"]
            assert st["spaces"] == 1
            assert [c["spaces"] for c in st["by_client"]] == [1]
            out = tool("status", address).stdout
            assert out.startswith(f"mComponent at {address}\n")
            assert "  spaces " in out and "by client:" in out
            client.free_space(space)
            assert status_json(address)["status"]["spaces"] == 0
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_status_renders_an_unknown_status_reply_field_by_field():
    # A kind this legorun has no rows for: its reply is still shown, field by field.
    from legorun import status
    text = status.render({
        "address": "unix:/m.sock", "kind": "xComponent", "health": "SERVING",
        "service": "legorun.x.v1.X",
        "status": {"uptime_s": 7300.0, "pages": 3, "bytes": 12288, "requests": 4,
                   "requests_by_op": {"fetch": 3, "alloc": 1},
                   "spaces": [{"client": "pid 7", "pages": 3, "bytes": 12288}]}})
    lines = text.splitlines()
    assert lines[0] == "xComponent at unix:/m.sock"
    assert "2 h 01 min" in text and "12.0 KiB (12288)" in text
    assert "spaces:" in text
    assert any(line.split() == ["pid", "7", "3", "12288"] for line in lines)


# ---------------------------------------------------------------- report

class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.tags, self.text = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href"):
                if tag == "img" and value.startswith("data:image/png;base64,"):
                    self.images.append(value.split(",", 1)[1])
                else:
                    self.external.append(value)

    def handle_data(self, data):
        self.text.append(data)


def check_png(data: bytes) -> tuple:
    """Assert `data` is a PNG that decodes; returns its (height, width)."""
    assert data.startswith(PNG_MAGIC)
    import matplotlib.image
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    return pixels.shape[:2]


def check_html(path) -> _Page:
    page = _Page()
    text = open(path, encoding="utf-8").read()
    page.feed(text)
    page.close()
    assert text.startswith("<!DOCTYPE html>")
    assert page.external == []  # opens offline: nothing to fetch
    assert not page.tags & {"script", "link", "iframe"}
    assert page.images
    for b64 in page.images:
        check_png(base64.b64decode(b64, validate=True))
    return page


@pytest.fixture(scope="module")
def stats_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    server = start_scomponent(tmp)
    try:
        script = ("import os\nfor i in range(20):\n"
                  "    p = f'/lego/f{i}'\n    open(p, 'w').write('y' * 1000)\n"
                  "    os.stat(p)\n    os.unlink(p)\n"
                  "try:\n    os.stat('/lego/missing')\nexcept FileNotFoundError:\n    pass\n")
        r = legorun([PY, "-c", script], storage=server.address, stats_file=tmp / "stats.json")
        assert r.returncode == 0, r.stderr
        assert r.stats["syscalls"]["unlink"]["count"] == 20
    finally:
        server.kill()
    return tmp / "stats.json"


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    p = subprocess.run([PY, "-m", "legorun", "bench", "-n", "1", "--warmup", "0", "--json", "-q",
                        "--", "/bin/true"], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    path = tmp / "bench.json"
    path.write_text(p.stdout)
    return path


def test_report_of_a_run_writes_an_offline_html_page(stats_json, tmp_path):
    out = tmp_path / "run.html"
    p = tool("report", stats_json, "-o", out)
    assert p.returncode == 0, p.stderr
    page = check_html(out)
    assert len(page.images) == 2  # forwarded syscalls, RPC mix
    text = " ".join(page.text)
    for needle in ("Forwarded syscalls", "unlink", "ptrace stops", "sComponent"):
        assert needle in text, needle


def test_report_draws_the_optional_excache_keys(stats_json, tmp_path):
    stats = json.loads(stats_json.read_text())
    stats["timeline"] = [{"t": i * 0.1, "resident_pages": min(64, 8 * i), "faults": 10 * i,
                          "capacity_pages": 64} for i in range(30)]
    stats["fault_latency_us"] = [50 + (i * 37) % 400 for i in range(500)]
    stats["excache"] = {"hits": 900, "misses": 300, "evictions": 236, "policy": "lru"}
    rich = tmp_path / "rich.json"
    rich.write_text(json.dumps(stats))
    assert tool("report", rich, "-o", tmp_path / "rich.html").returncode == 0
    page = check_html(tmp_path / "rich.html")
    assert len(page.images) == 5
    text = " ".join(page.text)
    assert "ExCache occupancy and fault rate" in text and "Fault latency" in text
    assert "median" in text and "p99" in text

    plain_png, rich_png = tmp_path / "plain.png", tmp_path / "rich.png"
    assert tool("report", stats_json, "-o", plain_png).returncode == 0
    assert tool("report", rich, "-o", rich_png).returncode == 0
    h_plain, _ = check_png(plain_png.read_bytes())
    h_rich, _ = check_png(rich_png.read_bytes())
    assert h_rich > h_plain  # the extra panels are in the one image


def test_report_of_a_run_as_one_png(stats_json, tmp_path):
    out = tmp_path / "run.png"
    p = tool("report", stats_json, "-o", out)
    assert p.returncode == 0, p.stderr
    check_png(out.read_bytes())
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(out) as im:
        im.verify()


def test_report_of_a_bench_result(bench_json, tmp_path):
    doc = json.loads(bench_json.read_text())
    assert doc["modes"] == ["native", "legorun"]
    p = tool("report", bench_json, "-o", tmp_path / "bench.html")
    assert p.returncode == 0, p.stderr
    page = check_html(tmp_path / "bench.html")
    assert len(page.images) == 1
    text = " ".join(page.text)
    assert "native" in text and "legorun" in text and "true" in text
    p = tool("report", bench_json, "-o", tmp_path / "bench.png")
    assert p.returncode == 0, p.stderr
    check_png((tmp_path / "bench.png").read_bytes())


def test_report_of_a_bench_suite(bench_json, tmp_path):
    doc = json.loads(bench_json.read_text())
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"startup": doc, "again": dict(doc, title="/bin/true again")}))
    assert tool("report", suite).returncode == 0  # default output: suite.html
    page = check_html(tmp_path / "suite.html")
    assert len(page.images) == 2  # wall times, slowdowns
    text = " ".join(page.text)
    assert "startup" in text and "/bin/true again" in text
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([doc, doc]))
    assert tool("report", listed, "-o", tmp_path / "list.png").returncode == 0
    check_png((tmp_path / "list.png").read_bytes())


def test_report_refuses_bad_input_in_one_line(tmp_path, stats_json):
    one_line_failure(tool("report", tmp_path / "missing.json"), "missing.json")
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    one_line_failure(tool("report", junk), "not JSON")
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    one_line_failure(tool("report", other), "not a legorun")
    one_line_failure(tool("report", stats_json, "-o", tmp_path / "r.txt"), "format")
    assert not (tmp_path / "r.txt").exists()
