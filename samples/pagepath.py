"""pagepath.py [MB=256] [TOUCHES=3000]: the remote page path, timed from inside a guest.

Run it with an ExCache far smaller than MB (issue #3, target 3):

  write-back  one byte written in every page of a fresh MB MiB bytearray, in
              order: every page is zero-filled locally and, the cache being
              small, written back to the mComponent when it is evicted. MB
              over the pass's time is the write-back throughput.
  page-in     one byte read from every page, in order: every page comes from
              the mComponent (readahead), and leaves clean (no write-back).
  touch       TOUCHES reads of one byte of a random page, each timed: under a
              small ExCache nearly every one is a remote fault of one page.

stdout: a checksum (deterministic); stderr: "write-back: X MB/s",
"page-in: X MB/s", "touch p50: X us" (natively these measure the local
memory system, for reference).
"""
import random
import sys
import time

PAGE = 4096


def main(argv):
    mb = int(argv[1]) if len(argv) > 1 else 256
    touches = int(argv[2]) if len(argv) > 2 else 3000
    n = mb << 20
    data = bytearray(n)
    t = time.perf_counter()
    for i in range(0, n, PAGE):
        data[i] = (i >> 12) & 0xFF
    wrote = time.perf_counter() - t
    total = 0
    t = time.perf_counter()
    for i in range(0, n, PAGE):
        total += data[i]
    read = time.perf_counter() - t
    rnd = random.Random(7)
    clock = time.perf_counter_ns
    lat = []
    pages = n // PAGE
    for _ in range(touches):
        i = rnd.randrange(pages) * PAGE
        t0 = clock()
        total += data[i]
        lat.append(clock() - t0)
    lat.sort()
    print("checksum", total)
    print(f"write-back: {n / wrote / 1e6:.1f} MB/s", file=sys.stderr)
    print(f"page-in: {n / read / 1e6:.1f} MB/s", file=sys.stderr)
    print(f"touch p50: {lat[len(lat) // 2] / 1000:.1f} us", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
