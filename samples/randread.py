"""randread.py DIR [FILE_MB=64] [COUNT]: random 4 KiB reads of a file.

Creates DIR/randread.dat (FILE_MB MiB) if it is missing or has another
size, outside the timed part; then issues COUNT (default: every block of
the file) os.pread()s of 4 KiB at distinct random block offsets (fixed
seed, so no block is read twice and runs are identical).  Prints
"randread: N reads/s" to stderr and a checksum of the data read to stdout.
Leave the file in place between runs so only the first run pays for it.
"""

import hashlib
import os
import random
import sys
import time

BLOCK = 4096


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    d = argv[1]
    size = int(float(argv[2]) * 1024 * 1024) if len(argv) > 2 else 64 << 20
    nblocks = size // BLOCK
    count = min(int(argv[3]), nblocks) if len(argv) > 3 else nblocks
    path = os.path.join(d, "randread.dat")
    try:
        have = os.stat(path).st_size
    except FileNotFoundError:
        have = -1
    if have != nblocks * BLOCK:
        with open(path, "wb") as f:
            for i in range(0, nblocks, 256):
                f.write(b"".join(i.to_bytes(8, "little") * (BLOCK // 8)
                                 for i in range(i, min(i + 256, nblocks))))
    blocks = random.Random(4096).sample(range(nblocks), count)
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for b in blocks:
            h.update(os.pread(fd, BLOCK, b * BLOCK))
        t1 = time.perf_counter()
    finally:
        os.close(fd)
    print(f"randread: {count / (t1 - t0):.0f} reads/s", file=sys.stderr)
    print(f"reads {count}")
    print(f"sha256 {h.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
