# legorun's dropper thread: started in the guest by an injected clone that
# runs the first instruction; r12 = its command block (shared with legorun).
# block: +0 u32 seq (legorun bumps it, then FUTEX_WAKE), +4 u32 done,
#        +8 u64 iovec count (-1: exit), +16 i64 result (at exit: the status
#        to exit with), +64 iovec[]
        .text
        .globl _start
_start:
        syscall                         # the injected clone (the parent stops after it)
        xorl    %r13d, %r13d            # the last seq served
wait:
        movl    $202, %eax              # futex(&seq, FUTEX_WAIT, last, NULL)
        movq    %r12, %rdi
        xorl    %esi, %esi
        movl    %r13d, %edx
        xorl    %r10d, %r10d
        syscall
        movl    (%r12), %eax
        cmpl    %r13d, %eax
        je      wait                    # spurious wake-up, or EAGAIN raced: wait again
        movl    %eax, %r13d
        movq    8(%r12), %rdx
        cmpq    $-1, %rdx
        je      quit
        movl    $440, %eax              # process_madvise(PIDFD_SELF_THREAD, iov, n, MADV_DONTNEED, 0)
        movq    $-10000, %rdi
        leaq    64(%r12), %rsi
        movl    $4, %r10d
        xorl    %r8d, %r8d
        syscall
        movq    %rax, 16(%r12)
        movl    %r13d, 4(%r12)          # done = seq
        movl    $202, %eax              # futex(&done, FUTEX_WAKE, 1)
        leaq    4(%r12), %rdi
        movl    $1, %esi
        movl    $1, %edx
        syscall
        jmp     wait
quit:
        movl    %r13d, 4(%r12)
        movl    $60, %eax               # exit(result): this thread only, with the
        movl    16(%r12), %edi          # status legorun gives (the guest's own)
        syscall
