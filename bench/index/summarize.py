#!/usr/bin/env python3
"""Summarize ratd-bench-index --json output: for each index (and the graph's warm and
inserted variants), the cheapest setting that reaches a recall target, as a markdown
table. Reads one or more files (or stdin); each file is one run (one head).

usage: summarize.py [--target 0.95] [--per-file] FILE...
"""
import json
import sys


def load(path):
    meta, rows = {}, []
    with (sys.stdin if path == "-" else open(path)) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            o = json.loads(line)
            if "index" in o:
                rows.append(o)
            else:
                meta = o
    return meta, rows


def variant(r):
    p = r["params"]
    v = r["index"]
    if ",warm" in p:
        v += "+warm"
    if ",inserted" in p:
        v += " (inserted keys)"
    return v


def best(rows, target):
    out = {}
    for r in rows:
        v = variant(r)
        cur = out.setdefault(v, {"hit": None, "max": None})
        if cur["max"] is None or r["recall"] > cur["max"]["recall"]:
            cur["max"] = r
        if r["recall"] >= target and (cur["hit"] is None or r["scanned_frac"] < cur["hit"]["scanned_frac"]):
            cur["hit"] = r
    return out


def main():
    args = sys.argv[1:]
    target = 0.95
    per_file = False
    files = []
    i = 0
    while i < len(args):
        if args[i] == "--target":
            target = float(args[i + 1])
            i += 2
        elif args[i] == "--per-file":
            per_file = True
            i += 1
        else:
            files.append(args[i])
            i += 1
    if not files:
        files = ["-"]
    if per_file:
        print(f"| data | n | Mahalanobis | graph scans @{target} | graph us | IVF scans @{target} | IVF us | IVF/graph scans |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for path in files:
            meta, rows = load(path)
            b = best(rows, target)
            g, iv = b.get("graph", {}).get("hit"), b.get("ivf", {}).get("hit")
            gs = f"{g['scanned_frac']:.4f} ({g['params']})" if g else "not reached"
            gu = f"{g['us_per_query']:.0f}" if g else "-"
            ivs = f"{iv['scanned_frac']:.4f} ({iv['params']})" if iv else "not reached"
            ivu = f"{iv['us_per_query']:.0f}" if iv else "-"
            ratio = f"{iv['scanned_frac'] / g['scanned_frac']:.1f}x" if g and iv else "-"
            name = meta.get("data", path).split(": ")[0].replace("trace ", "")
            print(f"| {name} | {meta.get('n', '?')} | {meta.get('mahalanobis_ratio', 0):.2f} | {gs} | {gu} | {ivs} | {ivu} | {ratio} |")
        return
    for path in files:
        meta, rows = load(path)
        print(f"data: {meta.get('data', path)}; n={meta.get('n')} dim={meta.get('dim')} "
              f"Mahalanobis ratio {meta.get('mahalanobis_ratio', 0):.2f}, step cosine {meta.get('step_cosine', 0):.2f}, "
              f"threads {meta.get('threads')}, {meta.get('isa')}")
        print()
        print(f"| index | cheapest setting with recall >= {target} | recall | scanned_frac | us/query | build_s | best recall (setting, scanned) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for v, b in best(rows, target).items():
            h, m = b["hit"], b["max"]
            hs = (f"{h['params']} | {h['recall']:.3f} | {h['scanned_frac']:.4f} | {h['us_per_query']:.0f} | {h['build_s']:.2f}"
                  if h else f"not reached | - | - | - | {m['build_s']:.2f}")
            print(f"| {v} | {hs} | {m['recall']:.3f} ({m['params']}, {m['scanned_frac']:.3f}) |")
        print()


if __name__ == "__main__":
    main()
