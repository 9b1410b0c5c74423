#!/usr/bin/env python3
"""bench/decode/summary.py FILE.json: one ratd-bench-decode JSON as the device scripts
print it (bench/decode/device-run*.sh): the run's figures on one line, then one line per
effort of a --sweep. Fields the run does not have are left out."""
import json
import sys

KEYS = ["context", "workers", "build_s", "gpu_build_s", "attend_us_p50", "attend_us_p90",
        "attend_us_p99", "attend_us_max", "token_ms_model_est", "rtt_us_p50", "server_us_p50",
        "work_us_p50", "append_us_p50", "recall_mean", "recall_p10", "recall_min", "mass_mean",
        "mass_p10", "retrieved_frac", "session_bytes", "lse_mismatch", "bad_positions"]
SWEEP = ["effort", "attend_us_p50", "attend_us_p99", "server_us_p50", "work_us_p50",
         "recall_mean", "recall_p10"]

d = json.load(open(sys.argv[1]))
print(" ".join("%s=%s" % (k, d[k]) for k in KEYS if k in d))
for i in range(d.get("sweep_n", 0)):
    print("  sweep", " ".join("%s=%s" % (k, d["sweep%d_%s" % (i, k)]) for k in SWEEP
                              if "sweep%d_%s" % (i, k) in d))
