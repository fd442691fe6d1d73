"""smallfiles.py DIR [N=2000]: metadata-heavy work on small files.

Creates N files of 100 bytes in a fresh directory DIR/smallfiles, stats
each one, then unlinks each one and removes the directory.  Prints
"smallfiles: X ops/s" (3N operations: create+write+close, stat, unlink) to
stderr and the file count to stdout.
"""

import os
import shutil
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    n = int(argv[2]) if len(argv) > 2 else 2000
    d = os.path.join(argv[1], "smallfiles")
    if os.path.exists(d):
        shutil.rmtree(d)
    os.mkdir(d)
    data = b"x" * 100
    names = [os.path.join(d, f"f{i:05d}") for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    stated = sum(1 for p in names if os.stat(p).st_size == len(data))
    for p in names:
        os.unlink(p)
    t1 = time.perf_counter()
    os.rmdir(d)
    print(f"smallfiles: {3 * n / (t1 - t0):.0f} ops/s", file=sys.stderr)
    print(f"files {stated}")
    return 0 if stated == n else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
