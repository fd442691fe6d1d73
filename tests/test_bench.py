"""Tests of legorun.bench: the pure statistics, comparison, table and JSON
functions, the runner on real processes, and one end-to-end run of
`python -m legorun bench` (skipped only while `python -m legorun` itself
does not work yet)."""

import json
import subprocess
import sys

import pytest

from legorun import bench as B


def run(mode, pair, wall, status=0, out=b"", warmup=False, stats=None,
        utime=0.1, stime=0.05, rss=1000):
    return B.RunResult(mode=mode, pair=pair, warmup=warmup, wall_s=wall,
                       utime_s=utime, stime_s=stime, maxrss_kb=rss,
                       exit_status=status, stdout=out, stats=stats)


# ---------------------------------------------------------------- statistics

def test_median_odd_even_empty():
    assert B.median([3, 1, 2]) == 2
    assert B.median([4, 1, 3, 2]) == 2.5
    assert B.median([]) is None
    assert B.median([5.0]) == 5.0


def test_spread():
    assert B.spread([2, 9, 4]) == {"median": 4, "min": 2, "max": 9, "n": 3}
    assert B.spread([])["median"] is None


def test_pair_ratios_and_spread_ignore_warmup():
    runs = [run("native", 0, 100.0, warmup=True), run("legorun", 0, 1.0, warmup=True),
            run("native", 0, 1.0), run("legorun", 0, 2.0),
            run("native", 1, 2.0), run("legorun", 1, 3.0),
            run("native", 2, 1.0), run("legorun", 2, 4.0)]
    ratios = B.pair_ratios(runs, "legorun")
    assert ratios == [2.0, 1.5, 4.0]
    s = B.ratio_spread(ratios)
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.5, 4.0)


def test_pair_ratios_skip_incomplete_pairs():
    runs = [run("native", 0, 1.0), run("legorun", 0, 3.0), run("native", 1, 1.0)]
    assert B.pair_ratios(runs, "legorun") == [3.0]


def test_summarize_mode_with_guest_rusage():
    st = {"guest_rusage": {"utime": 0.04, "stime": 0.01, "maxrss_kb": 2048}}
    runs = [run("legorun", i, 1.0 + i, utime=0.1, stime=0.05, rss=5000 + i,
                stats=st) for i in range(3)]
    s = B.summarize_mode(runs, "legorun")
    assert s["wall_s"]["median"] == 2.0 and s["maxrss_kb"] == 5002
    assert s["guest"] == {"utime_s": 0.04, "stime_s": 0.01, "maxrss_kb": 2048}
    assert s["overhead"]["utime_s"] == pytest.approx(0.06)
    assert s["overhead"]["stime_s"] == pytest.approx(0.04)


def test_summarize_counts_optional_keys():
    docs = [{"ptrace_stops": 10, "faults": 0,
             "rpcs": {"Open": {"count": 2}, "Read": {"count": 5}},
             "syscalls": {"openat": {"count": 3, "errors": 1, "time_s": 0.1}}},
            {"ptrace_stops": 14, "rpcs": {"Open": {"count": 2}, "Read": {"count": 7}}},
            None, {}]
    c = B.summarize_counts(docs)
    assert c["ptrace_stops"] == {"median": 12.0, "min": 10, "max": 14, "n": 2}
    assert c["rpcs"]["median"] == 8.0
    assert c["rpcs_by_name"] == {"Open": 2.0, "Read": 6.0}
    assert c["faults"]["n"] == 1
    assert c["syscalls"]["median"] == 3 and c["syscall_errors"]["median"] == 1
    assert B.summarize_counts([None]) == {"runs_with_stats": 0}


# ------------------------------------------------------- difference detection

def test_no_differences_when_identical():
    runs = [run("native", 0, 1, out=b"hi\n"), run("legorun", 0, 1, out=b"hi\n"),
            run("native", 1, 1, out=b"hi\n"), run("legorun", 1, 1, out=b"hi\n")]
    diffs, notes = B.detect_differences(runs)
    assert diffs == [] and notes == []


def test_exit_status_difference_reported():
    runs = [run("native", 0, 1), run("legorun", 0, 1, status=2),
            run("native", 1, 1), run("legorun", 1, 1)]
    diffs, _ = B.detect_differences(runs)
    assert [(d["kind"], d["pair"]) for d in diffs] == [("exit_status", 0)]
    assert "exit status 2, native 0" in diffs[0]["detail"]


def test_signal_status_described():
    assert B.describe_status(-9) == "-9 (SIGKILL)"


def test_stdout_difference_reported_when_natives_agree():
    runs = [run("native", 0, 1, out=b"a\nb\n"), run("legorun", 0, 1, out=b"a\nc\n"),
            run("native", 1, 1, out=b"a\nb\n"), run("legorun", 1, 1, out=b"a\nb\n")]
    diffs, _ = B.detect_differences(runs)
    assert len(diffs) == 1 and diffs[0]["kind"] == "stdout"
    assert "line 2" in diffs[0]["detail"] and "'c'" in diffs[0]["detail"]


def test_stdout_not_compared_when_two_natives_disagree():
    runs = [run("native", 0, 1, out=b"t=1.0\n"), run("legorun", 0, 1, out=b"t=9\n"),
            run("native", 1, 1, out=b"t=1.1\n"), run("legorun", 1, 1, out=b"t=8\n")]
    diffs, notes = B.detect_differences(runs)
    assert diffs == []
    assert any("not compared" in n for n in notes)


def test_stdout_not_compared_with_single_native_run():
    runs = [run("native", 0, 1, out=b"x"), run("legorun", 0, 1, out=b"y")]
    diffs, notes = B.detect_differences(runs)
    assert diffs == [] and any("only one" in n for n in notes)


def test_warmup_runs_count_for_comparison():
    runs = [run("native", 0, 1, out=b"x", warmup=True),
            run("legorun", 0, 1, out=b"x", warmup=True),
            run("native", 0, 1, out=b"x"), run("legorun", 0, 1, out=b"y")]
    diffs, _ = B.detect_differences(runs)
    assert [d["kind"] for d in diffs] == ["stdout"]


def test_first_difference():
    assert B.first_difference(b"a", b"a") == "identical"
    assert "line 1" in B.first_difference(b"a\n", b"b\n")
    assert "ends after" in B.first_difference(b"a\nb\n", b"a\n")
    assert "extra bytes" in B.first_difference(b"a\n", b"a\nb\n")


# ------------------------------------------------------------ table and JSON

def sample_report(diff=False):
    st = {"ptrace_stops": 7, "rpcs": {"Stat": {"count": 3}}, "faults": 0,
          "syscalls": {"openat": {"count": 2, "errors": 0, "time_s": 0.01}},
          "guest_rusage": {"utime": 0.01, "stime": 0.002, "maxrss_kb": 3000}}
    runs = []
    for p in range(3):
        runs.append(run("native", p, 0.01 + p * 0.001, out=b"hi\n", rss=2000))
        runs.append(run("legorun", p, 0.05 + p * 0.01,
                        out=b"ho\n" if diff and p == 1 else b"hi\n",
                        stats=st, rss=40000))
    return B.build_report(runs, ["/bin/echo", "hi"], ["--mount", "/m"], n=3, warmup=0)


def test_table_round_trip():
    rep = sample_report()
    text = B.format_table(rep)
    t = B.parse_table(text)
    assert t["rows"]["native"]["wall med (s)"] == pytest.approx(0.011)
    assert t["rows"]["legorun (total)"]["wall max (s)"] == pytest.approx(0.07)
    assert t["rows"]["guest"]["user (s)"] == pytest.approx(0.01)
    assert t["rows"]["guest"]["wall med (s)"] is None
    assert t["rows"]["legorun+components"]["user (s)"] == pytest.approx(0.09)
    assert t["rows"]["native"]["peak RSS (MiB)"] == pytest.approx(2.0, abs=0.05)
    assert t["slowdown"]["legorun"]["median"] == pytest.approx(6.0 / 1.1, rel=1e-2)
    assert t["slowdown"]["legorun"]["min"] <= t["slowdown"]["legorun"]["max"]
    assert t["counts"] == {"ptrace stops": 7, "RPCs": 3, "faults": 0,
                           "forwarded syscalls": 2}
    assert t["result"] == "OK"
    assert B.exit_code(rep) == 0


def test_table_reports_difference():
    rep = sample_report(diff=True)
    text = B.format_table(rep)
    assert "DIFFERENCE: legorun run 2: stdout differs" in text
    assert B.parse_table(text)["result"] == "DIFFERENT"
    assert B.exit_code(rep) == 1


def test_report_is_json_serialisable():
    rep = sample_report()
    doc = json.loads(json.dumps(rep))
    assert doc["ok"] is True
    assert doc["summary"]["legorun"]["guest"]["maxrss_kb"] == 3000
    assert len(doc["runs"]) == 6 and "stdout_sha256" in doc["runs"][0]


def test_fmt_num():
    assert B.fmt_num(None) == "-"
    assert B.fmt_num(0) == "0"
    assert B.fmt_num(1.23456) == "1.235"
    assert B.fmt_num(0.0012345) == "0.001234" or B.fmt_num(0.0012345) == "0.001235"
    assert B.fmt_num(123456.7) == "123457"


# -------------------------------------------------------------- arguments

def test_parse_args():
    a = B.parse_args(["-n", "3", "--json", "--mount", "/d", "-c", "--warmup=2",
                      "--", "prog", "-n", "x"])
    assert (a.n, a.json, a.warmup) == (3, True, 2)
    assert a.legorun_options == ["--mount", "/d", "-c"]
    assert a.command == ["prog", "-n", "x"]
    assert B.parse_args(["-n7", "--", "p"]).n == 7
    assert B.parse_args(["--", "p"]).n == 5


@pytest.mark.parametrize("argv", [[], ["-n", "0", "--", "p"], ["--"],
                                  ["-n", "--", "p"], ["--warmup", "x", "--", "p"]])
def test_parse_args_errors(argv):
    with pytest.raises(B.UsageError):
        B.parse_args(argv)


def test_main_usage_error_exit_2(capsys):
    assert B.main([]) == 2
    assert "usage" in capsys.readouterr().err


# ------------------------------------------------------ runner, real processes

def test_runner_measures_and_captures():
    runs = B.run_bench(["/bin/echo", "hello"], [B.Variant("native")], n=2, warmup=1)
    assert len(runs) == 3 and runs[0].warmup and not runs[1].warmup
    for r in runs:
        assert r.stdout == b"hello\n" and r.exit_status == 0 and r.wall_s > 0
        assert r.maxrss_kb > 0


def test_runner_stdin_is_dev_null_and_status():
    runs = B.run_bench([sys.executable, "-c",
                        "import sys; d = sys.stdin.read(); print(len(d)); sys.exit(4)"],
                       [B.Variant("native")], n=1, warmup=0)
    assert runs[0].stdout == b"0\n" and runs[0].exit_status == 4


def test_runner_detects_a_wrapper_that_changes_output():
    # a "legorun-like" variant that alters output: bench must flag it
    runs = B.run_bench(["/bin/echo", "hi"],
                       [B.Variant("native"), B.Variant("legorun", ["/bin/echo", "x"])],
                       n=2, warmup=1)
    rep = B.build_report(runs, ["/bin/echo", "hi"])
    assert not rep["ok"]
    assert {d["kind"] for d in rep["differences"]} == {"stdout"}


def test_runner_timeout_kills():
    runs = B.run_bench(["sleep", "10"], [B.Variant("native")], n=1, warmup=0,
                       timeout=0.3)
    assert runs[0].timed_out and runs[0].exit_status == -9 and runs[0].wall_s < 5


def test_runner_missing_program_raises():
    with pytest.raises(OSError):
        B.run_bench(["/nonexistent/prog"], [B.Variant("native")], n=1, warmup=0)


# ------------------------------------------------------------- end to end

def _legorun_functional() -> bool:
    try:
        p = subprocess.run([sys.executable, "-m", "legorun", "--", "/bin/true"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


@pytest.mark.skipif(not _legorun_functional(),
                    reason="`python -m legorun -- /bin/true` does not work yet")
def test_end_to_end_bench_table_parses():
    p = subprocess.run([sys.executable, "-m", "legorun", "bench", "-n", "1",
                        "--", "/bin/echo", "hi"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    t = B.parse_table(p.stdout)
    assert t["result"] == "OK"
    assert t["rows"]["native"]["wall med (s)"] > 0
    legorun_row = t["rows"].get("legorun (total)") or t["rows"]["legorun"]
    assert legorun_row["wall med (s)"] > 0
    assert t["slowdown"]["legorun"]["median"] > 0
