"""hello.py [MOUNT=/lego]: the smallest legorun demo.

Prints a greeting and the Python version, writes a small file under
MOUNT/hello/, reads it back, lists that directory and prints what it read.
Exercises: mkdir, open(O_CREAT|O_TRUNC), write, close, open, read,
getdents64 (listdir), on the mount.  The output is deterministic: the same
on every run of the same Python, natively (with MOUNT a local directory)
and under legorun.
"""

import os
import sys


def main(argv: list[str]) -> int:
    mount = argv[1] if len(argv) > 1 else "/lego"
    print("Hello from legorun's sample guest")
    print(f"Python {sys.version_info.major}.{sys.version_info.minor}."
          f"{sys.version_info.micro}")
    d = os.path.join(mount, "hello")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "greeting.txt")
    text = "Hello, disaggregated world!\n"
    with open(path, "w") as f:
        f.write(text)
    with open(path) as f:
        back = f.read()
    print(f"wrote {len(text)} bytes to {path}")
    print(f"listing of {d}: {sorted(os.listdir(d))}")
    print(f"read back: {back!r}")
    return 0 if back == text else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
