"""sortfloats.py [N=1000000]: sort N random floats (memory benchmark (d)).

Random access over the whole list: it thrashes any paging system at a small
ExCache. Fixed seed; prints a few order statistics (deterministic).
"""
import random
import sys


def main(argv):
    n = int(argv[1]) if len(argv) > 1 else 1000000
    rnd = random.Random(3)
    xs = [rnd.random() for _ in range(n)]
    xs.sort()
    print(round(xs[0], 9), round(xs[n // 2], 9), round(xs[-1], 9))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
