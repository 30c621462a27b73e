"""Cost of persisting SEIKO feedback as the dataset grows, as JSON.

For each sample shape and stored size ``N`` a fresh process fills a feedback store to ``N`` samples (in
chunks), then times persisted oracle batches of 64: ``add_pending`` of 64 samples (one shard) plus ``record`` of
their 64 answers (one shard). Reported per setting: seconds per persisted batch (median of ``--repeats``),
bytes written per batch (the new shard files and the manifest), the process's resident memory, and that memory
minus the process's memory before the store held anything and minus the raw float32 size of the stored samples
(what the store needs beyond the samples themselves).

    python benchmarks/feedback_store.py                       # shapes (2,) and (4, 64, 64); N = 1k, 10k, 50k
    python benchmarks/feedback_store.py --sizes 1000 10000    # smaller

The last stdout line is one JSON object: ``{"records": [...], "summary": {...}}`` with, per shape, the ratio of
the time per batch at the largest N to that at the smallest (the goal: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(shape: tuple, n: int, repeats: int) -> dict:
    import torch

    from hf_control_ft.feedback.oracle import OracleAnswer
    from hf_control_ft.feedback.store import FeedbackDataset

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        fb = FeedbackDataset(tmp, shape)
        base = rss_bytes()  # interpreter, torch, pyarrow: what any process pays before storing anything
        chunk = 1024  # the same fill pattern at every N: transient buffers do not depend on N
        while len(fb) < n:
            b = min(chunk, n - len(fb))
            q = fb.add_pending(torch.randn(b, *shape), round_index=1)
            fb.record(q, [OracleAnswer(0.5, "ok", "", 1)] * b, batch_index=len(fb))
        shard_dir = os.path.join(tmp, "shards")
        times, written = [], []
        for r in range(repeats):
            before = {e.name: e.stat().st_size for e in os.scandir(shard_dir)}
            x = torch.randn(BATCH, *shape)
            t0 = time.perf_counter()
            q = fb.add_pending(x, round_index=2)
            fb.record(q, [OracleAnswer(float(i), "ok", "", 1) for i in range(BATCH)], batch_index=r)
            times.append(time.perf_counter() - t0)
            written.append(sum(e.stat().st_size for e in os.scandir(shard_dir) if e.name not in before)
                           + os.path.getsize(os.path.join(tmp, "manifest.json")))
        rss = rss_bytes()
        samples_bytes = len(fb) * math.prod(shape) * 4
        reopen = time.perf_counter()
        FeedbackDataset(tmp, shape)
        reopen = time.perf_counter() - reopen
    return {"shape": list(shape), "n": n, "seconds_per_batch": statistics.median(times),
            "bytes_written_per_batch": int(statistics.median(written)), "rss_mb": rss / 2**20,
            "samples_mb": samples_bytes / 2**20, "rss_base_mb": base / 2**20,
            "rss_minus_base_and_samples_mb": (rss - base - samples_bytes) / 2**20,
            "reopen_seconds": reopen}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 50000])
    parser.add_argument("--shapes", nargs="+", default=["2", "4,64,64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "shape;n": measure in this process
    args = parser.parse_args()
    if args.one:
        shape, n = args.one.split(";")
        print(json.dumps(measure(tuple(int(d) for d in shape.split(",")), int(n), args.repeats)))
        return
    records = []
    for shape in args.shapes:
        for n in args.sizes:  # a fresh process per setting: its memory is the store's alone
            out = subprocess.run([sys.executable, __file__, "--one", f"{shape};{n}", "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            records.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(records[-1]), flush=True)
    summary = {}
    for shape in args.shapes:
        rows = [r for r in records if r["shape"] == [int(d) for d in shape.split(",")]]
        small, large = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
        summary[shape] = {"time_ratio_largest_vs_smallest": large["seconds_per_batch"] / small["seconds_per_batch"],
                          "rss_minus_base_and_samples_mb": {r["n"]: round(r["rss_minus_base_and_samples_mb"], 1)
                                                            for r in rows}}
    print(json.dumps({"records": records, "summary": summary}))


if __name__ == "__main__":
    main()
