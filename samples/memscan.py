"""memscan.py [MB=32] [PASSES=3] [STRIDE=4096]: a sequential multi-pass scan of a large bytearray.

Memory benchmark (a): every pass reads one byte every STRIDE bytes and
writes one back per page, so each page is fetched and dirtied once a pass
under a small ExCache. STRIDE 4096 touches one byte a page (all paging, no
work); 64 reads every cache line. Prints a checksum (deterministic).
"""
import sys


def main(argv):
    mb = int(argv[1]) if len(argv) > 1 else 32
    passes = int(argv[2]) if len(argv) > 2 else 3
    stride = int(argv[3]) if len(argv) > 3 else 4096
    data = bytearray(mb << 20)
    total = 0
    for p in range(passes):
        for i in range(0, len(data), stride):
            if i % 4096 == 0:
                data[i] = (data[i] + i // 4096 + p) & 0xFF
            total += data[i]
    print("checksum", total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
