"""Classic-BPF seccomp filters: a tiny assembler and the install call.

Filters decide on the syscall number and raw arguments only (never the
strings behind them). legorun installs one base filter before exec and
stacks a small one per fd number that becomes remote (see legorun.filters).
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from .ptrace import libc_syscall

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data offsets
OFF_NR = 0
OFF_ARCH = 4
OFF_IP = 8


def off_arg_lo(i: int) -> int:
    """Offset of the low 32 bits of argument i (little-endian)."""
    return 16 + 8 * i


BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_JA = 0x05
BPF_RET_K = 0x06
SECCOMP_SYSCALL = 317


@dataclass
class _Insn:
    code: int
    k: int = 0
    jt: object = 0  # int offset or label name
    jf: object = 0


class Assembler:
    """Builds a BPF program with named labels for forward jumps."""

    def __init__(self) -> None:
        self.insns: list[_Insn] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.insns.append(_Insn(BPF_LD_W_ABS, offset))

    def jeq(self, k: int, jt="next", jf="next") -> None:
        self.insns.append(_Insn(BPF_JEQ_K, k, jt, jf))

    def jge(self, k: int, jt="next", jf="next") -> None:
        self.insns.append(_Insn(BPF_JGE_K, k, jt, jf))

    def jset(self, k: int, jt="next", jf="next") -> None:
        self.insns.append(_Insn(BPF_JSET_K, k, jt, jf))

    def ret(self, action: int) -> None:
        self.insns.append(_Insn(BPF_RET_K, action))

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, insn in enumerate(self.insns):
            jt = self._offset(pc, insn.jt)
            jf = self._offset(pc, insn.jf)
            out += struct.pack("<HBBI", insn.code, jt, jf, insn.k & 0xFFFFFFFF)
        if len(self.insns) > 4096:
            raise ValueError("seccomp filter too long")
        return bytes(out)

    def _offset(self, pc: int, target) -> int:
        if target == "next":
            return 0
        if isinstance(target, int):
            return target
        dest = self.labels[target]
        off = dest - pc - 1
        if not 0 <= off <= 255:
            raise ValueError(f"jump to {target} out of range ({off})")
        return off


class sock_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes, tsync: bool = False) -> None:
    """Install `program` on the calling thread (used in the child before exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = sock_fprog(len(program) // 8, ctypes.addressof(buf))
    libc_syscall(SECCOMP_SYSCALL, SECCOMP_SET_MODE_FILTER,
                 SECCOMP_FILTER_FLAG_TSYNC if tsync else 0, ctypes.addressof(prog))
