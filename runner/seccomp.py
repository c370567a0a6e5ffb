"""A seccomp filter for container commands: docker's default profile, as a deny list.

The user namespace already keeps the kernel's privileged calls (modules, reboot, clock, swap,
kexec...) out of reach: they need capabilities in the initial namespace. What a container could
still do, and docker's profile forbids, is mostly *new* namespaces: ``unshare``/``clone`` with a
namespace flag create a nested user namespace whose root may mount, and ``setns``; plus the kernel
keyring, ``bpf``, ``perf_event_open``, ``userfaultfd`` and the new mount API. Those answer EPERM;
``clone3`` answers ENOSYS (its flags live in memory a filter cannot read), so the C library falls
back to ``clone``, as docker does. The privileged calls are listed too, as defence in depth.

The filter is classic BPF over ``struct seccomp_data`` (nr at 0, arch at 4, args from 16),
assembled below with symbolic jump targets. 32-bit x86 calls (``int 0x80``) are checked against
their own numbers; x32 calls are refused.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from runner import linux

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000

NAMESPACE_FLAGS = (linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWUSER
                   | linux.CLONE_NEWPID | linux.CLONE_NEWNET | 0x02000000)  # | CLONE_NEWCGROUP

# x86_64 numbers (asm/unistd_64.h; checked by tests against the header when it is installed).
X86_64_DENY = {
    "syslog": 103, "pivot_root": 155, "adjtimex": 159, "acct": 163, "settimeofday": 164, "mount": 165,
    "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "perf_event_open": 298,
    "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
    "setns": 308, "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442,
}
X86_64_NS_ARG0 = {"clone": 56, "unshare": 272}  # denied only with a namespace flag in arg 0
X86_64_ENOSYS = {"clone3": 435}
I386_DENY = {"mount": 21, "umount2": 52, "pivot_root": 217, "add_key": 286, "request_key": 287, "keyctl": 288,
             "perf_event_open": 336, "setns": 346, "bpf": 357, "userfaultfd": 374}
I386_NS_ARG0 = {"clone": 120, "unshare": 310}
I386_ENOSYS = {"clone3": 435}

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06


class _Assembler:
    """Instructions with symbolic jump targets, resolved to BPF's relative offsets."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> bytes:
        out = b""
        for index, (code, jt, jf, k) in enumerate(self.code):
            offsets = []
            for target in (jt, jf):
                if isinstance(target, str):
                    offset = self.labels[target] - index - 1
                    if not 0 <= offset <= 255:
                        raise ValueError(f"seccomp jump to {target} out of range")
                    offsets.append(offset)
                else:
                    offsets.append(target)
            out += struct.pack("HBBI", code, offsets[0], offsets[1], k)
        return out


def _arch_section(asm: _Assembler, deny: dict[str, int], ns_arg0: dict[str, int], enosys: dict[str, int],
                  x32_check: bool) -> None:
    asm.op(_LD_W_ABS, 0)  # nr
    if x32_check:
        asm.op(_JGE_K, X32_SYSCALL_BIT, "deny", 0)
    for nr in ns_arg0.values():
        asm.op(_JEQ_K, nr, "check_ns_flags", 0)
    for nr in enosys.values():
        asm.op(_JEQ_K, nr, "enosys", 0)
    for nr in deny.values():
        asm.op(_JEQ_K, nr, "deny", 0)
    asm.op(_RET_K, SECCOMP_RET_ALLOW)


def build_filter() -> bytes:
    asm = _Assembler()
    asm.op(_LD_W_ABS, 4)  # arch
    asm.op(_JEQ_K, AUDIT_ARCH_X86_64, 0, "not_x86_64")
    _arch_section(asm, X86_64_DENY, X86_64_NS_ARG0, X86_64_ENOSYS, x32_check=True)
    asm.label("not_x86_64")
    asm.op(_JEQ_K, AUDIT_ARCH_I386, 0, "allow")
    _arch_section(asm, I386_DENY, I386_NS_ARG0, I386_ENOSYS, x32_check=False)
    asm.label("check_ns_flags")
    asm.op(_LD_W_ABS, 16)  # low 32 bits of args[0] (little endian)
    asm.op(_JSET_K, NAMESPACE_FLAGS, "deny", "allow")
    asm.label("deny")
    asm.op(_RET_K, SECCOMP_RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.op(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)
    asm.label("allow")
    asm.op(_RET_K, SECCOMP_RET_ALLOW)
    return asm.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter() -> None:
    """Install the filter on the calling thread (needs no_new_privs, or CAP_SYS_ADMIN)."""
    program = build_filter()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    linux.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
