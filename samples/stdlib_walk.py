"""stdlib_walk.py: path-heavy local work; the mount is not used.

Walks the CPython standard library tree (os.path.dirname(os.__file__)),
os.stat()s every file and reads its first 4 KiB.  Prints the file count and
the total bytes read (deterministic for one Python installation).  About
50,000 files and 440,000 syscalls (openat, newfstatat, getdents64, read,
close): the benchmark for interception overhead on syscalls legorun does
not forward.  No arguments.
"""

import os
import sys


def main() -> int:
    root = os.path.dirname(os.__file__)
    files = 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                os.stat(p)
                with open(p, "rb") as f:
                    total += len(f.read(4096))
            except OSError:
                continue
            files += 1
    print(f"files {files}")
    print(f"bytes {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
