"""The syscall table is the one source of the filters, the dispatch and the docs."""
from __future__ import annotations

import pathlib

from legorun.kernel.sysnums import NR
from legorun.syscalls import table

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_compatibility_page_is_generated_from_the_table():
    page = (ROOT / "docs" / "syscalls.md").read_text()
    assert page == table.compatibility_page(), "run: python -m legorun.syscalls.table > docs/syscalls.md"


def test_every_entry_is_a_real_syscall_with_a_handler_or_a_filter_verdict():
    names = [e.name for e in table.TABLE]
    assert len(names) == len(set(names))
    for e in table.TABLE:
        assert e.name in NR
        assert (e.handler is None) == (e.trap == "deny")


def test_calls_easy_to_forget_never_fall_through_on_a_mount():
    for name in ("fchownat", "setxattr", "getxattr", "statx", "readlink", "utimes", "sendfile",
                 "copy_file_range", "splice", "execve", "io_uring_setup", "openat2", "faccessat2",
                 "fchmodat2", "renameat2", "close_range"):
        assert name in table.BY_NAME, name


def test_filters_assemble_within_jump_range():
    assert len(table.base_filter()) % 8 == 0
    for fd in (0, 1, 3, 1023, 65535):
        assert len(table.fd_filter(fd)) % 8 == 0
