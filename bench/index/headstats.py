#!/usr/bin/env python3
"""Shape statistics of attention heads: what makes a head hard for a graph index.

For every head of a ratd trace (keys = all positions but the sink and the window,
decode queries = the window's positions, as ratd-bench-index --trace), or for one head
saved by `ratd-bench-index --save PREFIX` (PREFIX.keys.npy, PREFIX.queries.npy), prints:

  z1, z100   mean standardized score of the decode queries' 1st and 100th key
             ((score - mean) / std over all keys): how far the top sits in the tail
  lift       top-k cohesion: of the m nearest keys (inner product) of a top-k key, the
             share that are also in the top-k, over the share by chance (k / N). A
             graph can only walk from one top key to the next if this is high
  mle, twonn local intrinsic dimension of the keys (Levina-Bickel MLE, 20 neighbours;
             TwoNN), on a sample of keys against all keys (L2)
  pr         participation ratio of the key covariance's eigenvalues (global dimension)
  fast       share of the key energy on the faster half of the RoPE pairs (HF
             rotate_half layout: pair j is (j, j + dim/2), j = 0 fastest)

Compare heads at the same N: lift, mle and twonn all depend on N.

usage: headstats.py --trace FILE [--queries 50]
       headstats.py --npy PREFIX [--queries 50]
Needs numpy.
"""
import argparse
import struct
import sys

import numpy as np

SINK, WINDOW = 128, 512  # ratd-lm-eval's defaults, as ratd-bench-index --trace


def query_stats(K, Q, k=100, m=32):
    """Where the decode queries' top-k sit in the score tail, and their cohesion."""
    S = Q @ K.T
    mu, sd = S.mean(1, keepdims=True), S.std(1, keepdims=True)
    srt = -np.sort(-S, 1)
    z = (srt - mu) / sd
    top = np.argsort(-S, 1)[:, :k]
    hit = []
    for t in top:
        G = K[t] @ K.T
        G[np.arange(len(t)), t] = -np.inf
        nn = np.argpartition(-G, m, axis=1)[:, :m]
        hit.append(np.isin(nn, t).mean())
    lift = float(np.mean(hit)) / (k / len(K))
    return dict(z1=float(z[:, 0].mean()), z100=float(z[:, k - 1].mean()), lift=lift)


def key_stats(K, nsample=1500, seed=0):
    """Dimension and RoPE energy of the keys alone (shared by a KV head's query heads)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(K), min(nsample, len(K)), replace=False)
    sq = (K * K).sum(1)
    D = sq[idx][:, None] + sq[None, :] - 2 * K[idx] @ K.T
    D[np.arange(len(idx)), idx] = np.inf
    D = np.sqrt(np.maximum(D, 1e-12))
    nn = np.sort(np.partition(D, 20, axis=1)[:, :20], 1)
    nn = np.maximum(nn, 1e-9)
    mle = float(np.mean(1.0 / np.mean(np.log(nn[:, -1:] / nn[:, :-1]), axis=1)))
    twonn = float(len(nn) / np.sum(np.log(nn[:, 1] / nn[:, 0])))
    w = np.linalg.eigvalsh(np.cov(K.T))
    pr = float(w.sum() ** 2 / (w ** 2).sum())
    h = K.shape[1] // 2
    e = (K[:, :h] ** 2 + K[:, h:] ** 2).mean(0)
    fast = float(e[: h // 2].sum() / e.sum())
    return dict(n=len(K), mle=mle, twonn=twonn, pr=pr, fast=fast)


def trace_heads(path, nq):
    with open(path, "rb") as f:
        h = f.read(64)
    if h[:8] != b"RATRACE\0":
        sys.exit(f"{path}: not a ratd trace")
    ver, dt, L, H, KVH, D, N, p0 = struct.unpack("<8I", h[8:40])
    if ver != 1 or dt not in (0, 1):
        sys.exit(f"{path}: trace version {ver} dtype {dt}: need version 1, f32 or f16")
    typ = np.float32 if dt == 0 else np.float16
    data = np.memmap(path, typ, "r", offset=64)
    per = (H + 2 * KVH) * N * D
    if len(data) != L * per:
        sys.exit(f"{path}: size disagrees with its header")
    step = max(1, WINDOW // nq)
    for layer in range(L):
        base = layer * per
        Qa = data[base:base + H * N * D].reshape(H, N, D)
        Ka = data[base + H * N * D:base + (H + KVH) * N * D].reshape(KVH, N, D)
        for g in range(KVH):
            K = np.asarray(Ka[g][SINK:N - WINDOW], np.float32)
            ks = key_stats(K)
            for hq in range(g * (H // KVH), (g + 1) * (H // KVH)):
                Q = np.asarray(Qa[hq][N - WINDOW:][::step][:nq], np.float32)
                yield f"{layer} / {hq}", K, Q, ks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace")
    ap.add_argument("--npy")
    ap.add_argument("--queries", type=int, default=50)
    a = ap.parse_args()
    if bool(a.trace) == bool(a.npy):
        ap.error("give --trace FILE or --npy PREFIX")
    if a.trace:
        heads = trace_heads(a.trace, a.queries)
    else:
        K = np.load(a.npy + ".keys.npy").astype(np.float32)
        Q = np.load(a.npy + ".queries.npy").astype(np.float32)[: a.queries]
        heads = [(a.npy, K, Q, key_stats(K))]
    print("| head | keys | z1 | z100 | lift | mle | twonn | pr | fast |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, K, Q, ks in heads:
        s = {**ks, **query_stats(K, Q)}
        print(f"| {name} | {s['n']} | {s['z1']:.2f} | {s['z100']:.2f} | {s['lift']:.1f} | "
              f"{s['mle']:.1f} | {s['twonn']:.1f} | {s['pr']:.1f} | {s['fast']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
