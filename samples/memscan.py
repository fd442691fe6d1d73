"""memscan.py [MB=32] [PASSES=3]: a sequential multi-pass scan of a large bytearray.

Memory benchmark (a): every pass reads one byte per 4 KiB page and writes
one back, so each page is fetched and dirtied once a pass under a small
ExCache. Prints a checksum (deterministic).
"""
import sys


def main(argv):
    mb = int(argv[1]) if len(argv) > 1 else 32
    passes = int(argv[2]) if len(argv) > 2 else 3
    data = bytearray(mb << 20)
    total = 0
    for p in range(passes):
        for i in range(0, len(data), 4096):
            data[i] = (data[i] + i // 4096 + p) & 0xFF
            total += data[i]
    print("checksum", total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
