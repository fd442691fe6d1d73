"""--trace, -e, -o, --trace-json, -c and --stats-json show what was forwarded, truly."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

PY = sys.executable
LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\) = (-?\d+|0x[0-9a-f]+)(?: (\w+) \((.*)\))? "
                  r"<([\w ]+) (\d+\.\d{6})>$")

GUEST = textwrap.dedent("""
    import os
    for i in range(5):
        with open(f'/lego/f{i}', 'w') as f:
            f.write('x' * i)
    for i in range(5):
        os.stat(f'/lego/f{i}')
    try:
        open('/lego/missing')
    except FileNotFoundError:
        pass
    print('done')
""")


def _trace(scomponent, tmp_path, *opts):
    out = tmp_path / "trace.txt"
    cmd_opts = ["--trace", "-o", str(out), "--trace-json", str(tmp_path / "t.jsonl"), *opts]
    p = subprocess.run([PY, "-m", "legorun", "--storage", scomponent.address, *cmd_opts,
                        "--stats-json", str(tmp_path / "s.json"), "--", PY, "-c", GUEST],
                       capture_output=True, text=True, timeout=120)
    return p, out.read_text().splitlines(), [json.loads(x) for x in
                                              (tmp_path / "t.jsonl").read_text().splitlines()]


def test_trace_lines_parse_as_strace_lines_and_count_truly(scomponent, tmp_path):
    p, lines, events = _trace(scomponent, tmp_path, "-e", "trace=%file")
    assert p.returncode == 0 and p.stdout == "done\n", p.stderr
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    names = [m.group(2) for m in parsed]
    opens = [m for m in parsed if m.group(2) == "openat"]
    assert len(opens) == 6                               # five files and the missing one
    assert opens[0].group(3) == 'AT_FDCWD, "/lego/f0", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666'
    assert opens[-1].group(4) == "-1" and opens[-1].group(5) == "ENOENT"
    assert opens[-1].group(6) == "No such file or directory"
    assert all(m.group(7) == "sComponent" for m in opens)
    assert names.count("newfstatat") >= 5
    assert "write" not in names                          # %file leaves out fd-only calls
    # JSON lines carry the same events, with documented fields
    assert [e["name"] for e in events] == names
    for e in events:
        assert set(e) == {"time", "pid", "tid", "event", "name", "args", "result", "errno",
                          "served_by", "seconds"}
    assert events[-1]["errno"] == "ENOENT" and events[-1]["result"] == -1
    # --stats-json counts every forwarded call, traced or not
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["syscalls"]["openat"] == {"count": 6, "errors": 1,
                                           "time_s": stats["syscalls"]["openat"]["time_s"]}
    assert stats["syscalls"]["write"]["count"] == 4      # f1..f4 (f0 writes nothing)


def test_single_names_and_negation(scomponent, tmp_path):
    _, lines, _ = _trace(scomponent, tmp_path, "-e", "trace=write")
    assert [LINE.match(x).group(2) for x in lines] == ["write"] * 4
    assert LINE.match(lines[-1]).group(3) == '3, "xxxx", 4'
    _, lines, _ = _trace(scomponent, tmp_path, "-e", "trace=!write,newfstatat")
    names = {LINE.match(x).group(2) for x in lines}
    assert "openat" in names and "write" not in names and "newfstatat" not in names


def test_bad_filter_is_a_one_line_error(scomponent, tmp_path):
    p, _, _ = _trace(scomponent, tmp_path, "-e", "trace=%nonsense")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "%nonsense" in p.stderr


def test_summary_is_an_strace_c_table(scomponent, tmp_path):
    p = subprocess.run([PY, "-m", "legorun", "--storage", scomponent.address, "-c", "--", PY,
                        "-c", GUEST], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    rows = {}
    for line in p.stderr.splitlines():
        m = re.match(r"^\s*([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d*)\s+(\w+)$", line)
        if m:
            rows[m.group(6)] = (int(m.group(4)), int(m.group(5) or 0))
    assert rows["openat"] == (6, 1)
    assert rows["write"] == (4, 0)
