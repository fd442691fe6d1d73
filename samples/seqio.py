"""seqio.py DIR [SIZE_MB=256] [CHUNK_KB=1024]: sequential file throughput.

Writes a SIZE_MB MiB file DIR/seqio.dat in CHUNK_KB KiB chunks (then
fsync), reads it back sequentially in the same chunks, and removes it.
Only the writes with their fsync, and the reads, are timed: not the opens
(under legorun the first one may start the embedded sComponent).
Prints "write: X MB/s" and "read: Y MB/s" (MB = 10^6 bytes) to stderr and a
checksum of the data read (deterministic) to stdout.  Exercises open,
write, fsync, read, unlink on DIR: run it with DIR on a mount to measure
legorun's file forwarding.
"""

import hashlib
import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    d = argv[1]
    size = int(float(argv[2]) * 1024 * 1024) if len(argv) > 2 else 256 << 20
    chunk = int(argv[3]) * 1024 if len(argv) > 3 else 1 << 20
    path = os.path.join(d, "seqio.dat")
    # deterministic, incompressible-looking pattern
    block = hashlib.sha256(b"legorun").digest() * (chunk // 32 + 1)
    block = block[:chunk]
    with open(path, "wb", buffering=0) as f:
        t0 = time.perf_counter()  # the writes and the fsync are timed, not the open
        left = size
        while left > 0:
            n = f.write(block[:min(chunk, left)])
            left -= n
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    h = hashlib.sha256()
    got = 0
    reading = 0.0  # only the reads are timed, not the checksum
    with open(path, "rb", buffering=0) as f:
        while True:
            r0 = time.perf_counter()
            b = f.read(chunk)
            reading += time.perf_counter() - r0
            if not b:
                break
            got += len(b)
            h.update(b)
    os.unlink(path)
    print(f"write: {size / (t1 - t0) / 1e6:.1f} MB/s", file=sys.stderr)
    print(f"read: {got / reading / 1e6:.1f} MB/s", file=sys.stderr)
    print(f"bytes {got}")
    print(f"sha256 {h.hexdigest()}")
    return 0 if got == size else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
