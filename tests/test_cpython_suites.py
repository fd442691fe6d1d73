"""CPython's own test_fileio, test_tempfile and test_shutil, natively and under legorun.

Each suite runs twice with `python -m unittest -v`: natively with TMPDIR (and the
cwd, where test.support puts TESTFN) in a local directory, and under legorun with
both on the mount, served by a real sComponent. The per-test outcomes
(ok / FAIL / ERROR / skipped / expected failure / unexpected success) must be the
same, except for the tests listed in KNOWN_DIFFERENCES, each with the root cause
in legorun. Fix a cause, then delete its entries: an entry that no longer differs
is reported as a warning ("stale"), and one for a suite (a module name) means the
suite cannot even start under legorun, so the comparison is an xfail until fixed.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings

import pytest

from conftest import legorun, native

PY = sys.executable
SUITES = ("test_fileio", "test_tempfile", "test_shutil")
MOUNT = "/lego"

# ---- why legorun differs today (root causes, by number of tests they explain)

NO_XATTR = "extended attributes are refused with ENOTSUP on a mount (documented limit)"
NO_FIFO = "mkfifo/mknod is refused with EPERM on a mount (documented limit)"

KNOWN_DIFFERENCES = {
    "test.test_shutil.TestCopy.test_copy2_xattr": NO_XATTR,
    "test.test_shutil.TestCopy.test_copyxattr": NO_XATTR,
    "test.test_shutil.TestCopy.test_copyxattr_symlinks": NO_XATTR,
    "test.test_shutil.TestCopy.test_copyfile_named_pipe": NO_FIFO,
    "test.test_shutil.TestCopyTree.test_copytree_named_pipe": NO_FIFO,
}

# ---- parsing `python -m unittest -v`

_HEADER = re.compile(r"^(\w+) \(([\w.]+)\)")
_RESULT = re.compile(r"(?:^|\.\.\. )(ok|FAIL|ERROR|skipped .*|skipped|expected failure|"
                     r"unexpected success)$")
_RAN = re.compile(r"^Ran (\d+) tests? in ", re.M)
_SUMMARY = re.compile(r"^(OK|FAILED)(?: \((.*)\))?$", re.M)


def parse_unittest(output: str):
    """({test_id: outcome}, {"ran": N, "failures": .., "errors": .., "skipped": ..} or None).

    The -v format is `name (test_id) ... RESULT`, with the docstring's first line
    between the two when the test has one (`name (test_id)\\nDoc ... RESULT`).
    """
    outcomes = {}
    pending = None
    for line in output.splitlines():
        m = _HEADER.match(line)
        if m:
            pending = m.group(2)
        r = _RESULT.search(line)
        if r and pending is not None:
            outcomes[pending] = r.group(1)
            pending = None
    ran = _RAN.search(output)
    summary = _SUMMARY.search(output, ran.end()) if ran else None
    if not ran or not summary:
        return outcomes, None
    counts = {"ran": int(ran.group(1)), "failures": 0, "errors": 0, "skipped": 0,
              "expected_failures": 0, "unexpected_successes": 0}
    for part in (summary.group(2) or "").split(","):
        if "=" in part:
            key, value = part.strip().split("=")
            counts[key] = int(value)
    return outcomes, counts


def kind(outcome: str) -> str:
    return "skipped" if outcome.startswith("skipped") else outcome


# ---- running a suite

def _suite_command(suite: str, cwd: str) -> list:
    # cd in the guest itself: legorun starts it in a local cwd, and /lego need not exist here
    return ["sh", "-c", f'cd "$1" && exec "$2" -m unittest -v "test.{suite}"', "sh", cwd, PY]


def _env(tmpdir: str) -> dict:
    env = dict(os.environ)
    env["TMPDIR"] = tmpdir
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture(scope="module")
def native_results(tmp_path_factory):
    """Each suite once natively, shared by the parametrized tests."""
    cache = {}

    def get(suite):
        if suite not in cache:
            d = tmp_path_factory.mktemp(f"native-{suite}")
            run = native(_suite_command(suite, str(d)), env=_env(str(d)), timeout=180)
            outcomes, counts = parse_unittest(run.stderr)
            assert counts is not None, f"{suite} did not run natively:\n{run.stderr[-3000:]}"
            cache[suite] = outcomes, counts
        return cache[suite]
    return get


@pytest.mark.parametrize("suite", SUITES)
def test_suite_matches_native(suite, scomponent, native_results):
    if importlib.util.find_spec(f"test.{suite}") is None:
        pytest.skip(f"this Python has no test.{suite} (its test package is not installed)")
    nat, nat_counts = native_results(suite)

    workdir = f"tmp-{suite}"
    os.mkdir(os.path.join(scomponent.root, workdir))  # the server's root is /lego
    guest_dir = f"{MOUNT}/{workdir}"
    run = legorun(_suite_command(suite, guest_dir), storage=scomponent.address,
                  env=_env(guest_dir), timeout=180)
    lego, lego_counts = parse_unittest(run.stderr)

    module = f"test.{suite}"
    if lego_counts is None:
        if module in KNOWN_DIFFERENCES:
            pytest.xfail(f"{module} does not run under legorun: {KNOWN_DIFFERENCES[module]}")
        pytest.fail(f"{module} did not run under legorun (exit {run.returncode}):\n"
                    f"{run.stderr[-3000:]}")
    if module in KNOWN_DIFFERENCES:
        warnings.warn(f"stale KNOWN_DIFFERENCES entry: {module} now runs under legorun")

    assert lego_counts["ran"] == nat_counts["ran"], (nat_counts, lego_counts)
    assert len(nat) == nat_counts["ran"], "could not parse every native outcome"
    assert len(lego) == lego_counts["ran"], "could not parse every outcome under legorun"

    unexpected, known = [], []
    for test_id in sorted(set(nat) | set(lego)):
        a, b = nat.get(test_id, "missing"), lego.get(test_id, "missing")
        if kind(a) == kind(b):
            if test_id in KNOWN_DIFFERENCES:
                warnings.warn(f"stale KNOWN_DIFFERENCES entry: {test_id} is {a} both ways")
            continue
        line = f"{test_id}: native {a!r}, legorun {b!r}"
        (known if test_id in KNOWN_DIFFERENCES else unexpected).append(line)
    assert not unexpected, (
        f"{len(unexpected)} outcome(s) differ from native ({len(known)} known):\n"
        + "\n".join(unexpected) + f"\n\nlegorun's output (tail):\n{run.stderr[-4000:]}")

    # With only known differences left, the counts differ by exactly those tests.
    if not known:
        assert lego_counts == nat_counts
