"""Prints a bench.sh table from the JSON lines of scripts/bench/measure.py: medians of the runs,
the largest peak RSS of each contender, and its ratios; exits 1 if a run failed.

  report.py floors RESULTS INPUT_BYTES TITLE   ratios to the `floor: cat` rows
  report.py disk RESULTS SIZES ONE EIGHT       output GB/s against the best 8-stream dd row
                                               and against dd copying the checkpoint's files
                                               (SIZES: "keep BYTES", "bf16 BYTES" and "source
                                               BYTES" lines; ONE, EIGHT: bytes dd writes with 1
                                               and 8 streams)
"""

import json
import statistics
import sys


def load(path):
    rows = [json.loads(line) for line in open(path)]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    med = {l: statistics.median(r["seconds"] for r in rows if r["label"] == l) for l in labels}
    rss = {l: max(r["peak_rss_mib"] for r in rows if r["label"] == l) for l in labels}
    return rows, labels, med, rss


def table(header, lines):
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def floors(results, size, title):
    rows, labels, med, rss = load(results)
    size = int(size)
    print(f"\n{title}: {size/1e9:.2f} GB of input, median of {len(rows)//len(labels)} runs\n")
    cat, synced = med["floor: cat"], med["floor: cat + fsync"]
    table(
        ["contender", "seconds", "GB/s", "peak RSS (per process)", "vs `cat`", "vs `cat` + fsync"],
        [[l, f"{med[l]:.2f}", f"{size/1e9/med[l]:.2f}", f"{rss[l]:.0f} MiB",
          f"{med[l]/cat:.2f}x", f"{med[l]/synced:.2f}x"] for l in labels],
    )
    return rows


def disk(results, sizes, one, eight):
    rows, labels, med, rss = load(results)
    written = dict(line.split() for line in open(sizes))

    def size(l):
        if l.startswith("dd, 1 stream"):
            return int(one)
        if l.startswith("dd, 8 streams"):
            return int(eight)
        if l.startswith("dd, the checkpoint's files"):
            return int(written["source"])
        return int(written["bf16" if l.endswith("bf16") else "keep"])

    gbs = {l: size(l) / 1e9 / med[l] for l in labels}
    best = max(gbs[l] for l in labels if l.startswith("dd, 8 streams"))
    copy = next(gbs[l] for l in labels if l.startswith("dd, the checkpoint's files"))
    print(f"\ndisk: one process vs dd on the output's filesystem, median of {len(rows)//len(labels)} runs\n")
    table(
        ["contender", "GB written", "seconds", "GB/s", "peak RSS", "vs best 8-stream dd",
         "vs dd of the checkpoint"],
        [[l, f"{size(l)/1e9:.2f}", f"{med[l]:.2f}", f"{gbs[l]:.2f}", f"{rss[l]:.0f} MiB",
          f"{gbs[l]/best:.0%}", f"{gbs[l]/copy:.0%}"] for l in labels],
    )
    return rows


def main(argv):
    kinds = {"floors": (floors, 3), "disk": (disk, 4)}
    if len(argv) < 2 or argv[1] not in kinds or len(argv) != 2 + kinds[argv[1]][1]:
        sys.exit(__doc__)
    rows = kinds[argv[1]][0](*argv[2:])
    bad = [r for r in rows if r["exit"] != 0]
    if bad:
        print(f"FAILED runs: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
