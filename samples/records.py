"""records.py [N=300000] [PASSES=3]: build many small Python records, then make
aggregation passes over them with a small hot lookup table.

Memory benchmark (c), the LegoOS-style workload: CPython's reference counts
dirty every page a pass touches, so under a small ExCache a pass writes
back about as much as it fetches. Prints the aggregates (deterministic).
"""
import sys


def main(argv):
    n = int(argv[1]) if len(argv) > 1 else 300000
    passes = int(argv[2]) if len(argv) > 2 else 3
    regions = ["north", "south", "east", "west", "centre"]
    weights = {r: i + 1 for i, r in enumerate(regions)}          # the hot table
    records = [(i, regions[i % 5], (i * 7919) % 1000 / 10.0) for i in range(n)]
    for p in range(passes):
        sums = dict.fromkeys(regions, 0.0)
        for _, region, value in records:
            sums[region] += value * weights[region]
        print(p, " ".join(f"{r}={sums[r]:.1f}" for r in regions))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
