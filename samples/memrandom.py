"""memrandom.py [MB=32] [TOUCHES=20000]: random page touches in a large bytearray.

Memory benchmark (b): fixed seed, so the output is deterministic.
"""
import random
import sys


def main(argv):
    mb = int(argv[1]) if len(argv) > 1 else 32
    touches = int(argv[2]) if len(argv) > 2 else 20000
    data = bytearray(mb << 20)
    pages = len(data) // 4096
    rnd = random.Random(42)
    total = 0
    for _ in range(touches):
        i = rnd.randrange(pages) * 4096
        data[i] = (data[i] + 1) & 0xFF
        total += data[i]
    print("checksum", total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
