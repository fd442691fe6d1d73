"""Shared fixtures: a real sComponent process and a way to run guests under legorun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest


@dataclass
class Server:
    address: str
    root: str
    proc: subprocess.Popen

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_scomponent(tmp_path, name="s") -> Server:
    root = tmp_path / f"{name}-root"
    root.mkdir()
    address = f"unix:{tmp_path}/{name}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "legorun_components.scomponent", "--listen", address,
         "--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on"), (line, proc.stderr.read())
    return Server(address, str(root), proc)


@pytest.fixture
def scomponent(tmp_path):
    server = start_scomponent(tmp_path)
    yield server
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(10)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    stats: dict | None


def legorun(args: list, storage: str | None = None, mounts=("/lego",), input: str | None = None,
            env: dict | None = None, timeout: float = 120, stats_file=None, cwd=None,
            options=()) -> Run:
    """Run `legorun [--storage ADDR] [--mount M]... [OPTIONS] -- args` and capture everything."""
    cmd = [sys.executable, "-m", "legorun", *options]
    if storage:
        cmd += ["--storage", storage]
    for m in mounts:
        cmd += ["--mount", m]
    if stats_file is not None:
        cmd += ["--stats-json", str(stats_file)]
    cmd += ["--", *args]
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    stats = None
    if stats_file is not None and os.path.exists(stats_file):
        with open(stats_file) as f:
            stats = json.load(f)
    return Run(p.returncode, p.stdout, p.stderr, stats)


def native(args: list, input: str | None = None, env=None, cwd=None, timeout=120) -> Run:
    p = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    return Run(p.returncode, p.stdout, p.stderr, None)


def compile_c(tmp_path, name: str, source: str, flags=()) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the C guest")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    exe = tmp_path / name
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src), *flags], check=True)
    return str(exe)


def within(seconds, fn):
    """Run fn in a thread; fail the test (instead of hanging it) if it takes longer."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")
