#!/usr/bin/env python3
"""bench/decode/timeline.py LOG...: medians of the daemon's RATD_TIMELINE lines in each
log (ratd-bench-decode's stderr with RATD_TIMELINE=N set): where an Attend's time went,
in µs after its arrival: submitted to the pool, last task started, last task ended,
reply; and the longest task."""
import re
import statistics
import sys

PAT = re.compile(r"timeline: request \d+ \(attend\) of (\d+) tasks: submitted (\d+), last task "
                 r"started (\d+), ended (\d+), reply (\d+) us after arrival; work (\d+) us, "
                 r"longest task (\d+) us(?:, (\d+) tasks after another on one worker)?")

for path in sys.argv[1:]:
    rows = [tuple(int(x or 0) for x in m.groups()) for m in PAT.finditer(open(path).read())]
    if not rows:
        print(f"{path}: no timeline lines")
        continue
    med = [statistics.median(r[i] for r in rows) for i in range(8)]
    print(f"{path}: {len(rows)} Attends, {med[0]:.0f} tasks: submitted {med[1]:.0f}, last task "
          f"started {med[2]:.0f}, ended {med[3]:.0f}, reply {med[4]:.0f} us; work {med[5]:.0f}, "
          f"longest task {med[6]:.0f} us, {med[7]:.0f} tasks after another on one worker "
          f"(mean {statistics.mean(r[7] for r in rows):.2f}) (medians)")
