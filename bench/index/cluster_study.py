#!/usr/bin/env python3
"""How much of a head an attention-aware cluster index (IVF) must read for recall@100.

A question asked before building one (issue 10, fourteenth session): pscan reads every
key's code at every decode step, so its floor is the codes' bytes; an inverted file that
reads only the best clusters would read fewer. This measures how few, offline, on heads
saved by `ratd-bench-index --synthetic ... --save PREFIX` (PREFIX.keys.npy, .train.npy,
.queries.npy; with --group G the decode queries of a step are G consecutive rows).

The clustering is attention-aware the way pscan's projection is: keys are whitened by
the training queries' second moment Sq (k -> Sq^1/2 (k - mean), q -> Sq^-1/2 q: the same
q.k up to a constant a query, and the queries isotropic), then k-means (NLIST centroids,
10 Lloyd steps on 32,768 sampled keys, every key assigned to its nearest). A query reads
clusters in the order of its score on their centroids until it has read a share f of the
keys; recall is the share of its exact top-100 in what it read (before any code: an upper
bound on what the index would return). For a GQA group the step reads the union of its
queries' clusters, once.

    python3 bench/index/cluster_study.py PREFIX [NLIST] [GROUP]

Prints, for each f: mean recall over the queries, and the share of the keys one step
reads (the union over the group). Needs numpy (Debian: python3-numpy).
"""
import sys

import numpy as np


def whiten(K, T):
    d = K.shape[1]
    sq = T.T @ T / len(T)
    sq += np.eye(d) * 0.01 * np.trace(sq) / d  # the build's regularisation
    w, v = np.linalg.eigh(sq)
    w = np.maximum(w, 1e-30)
    return ((v * np.sqrt(w)) @ v.T).astype(np.float32), ((v / np.sqrt(w)) @ v.T).astype(np.float32)


def nearest(X, C):
    return np.argmax(X @ C.T - 0.5 * (C * C).sum(1), axis=1)


def kmeans(X, k, it=10, seed=0):
    C = X[np.random.default_rng(seed).choice(len(X), k, replace=False)].copy()
    for _ in range(it):
        a = nearest(X, C)
        for j in range(k):
            m = a == j
            if m.any():
                C[j] = X[m].mean(0)
    return C


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    prefix = sys.argv[1]
    nl = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    G = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    K = np.load(prefix + ".keys.npy").astype(np.float32)
    Q = np.load(prefix + ".queries.npy").astype(np.float32)
    T = np.load(prefix + ".train.npy").astype(np.float64)
    if G < 1 or len(Q) % G:
        sys.exit("GROUP must divide the number of decode queries")
    sh, shi = whiten(K, T)
    Kw = (K - K.mean(0)) @ sh
    Qw = Q @ shi
    N = len(K)
    rng = np.random.default_rng(1)
    C = kmeans(Kw[rng.choice(N, min(N, 32768), replace=False)], nl)
    a = np.concatenate([nearest(Kw[s : s + 16384], C) for s in range(0, N, 16384)])
    sizes = np.bincount(a, minlength=nl)
    top = np.argsort(-(Q @ K.T), axis=1)[:, :100]
    order = np.argsort(-(Qw @ C.T), axis=1)
    print(f"# {prefix}: {N} keys, {len(Q)} queries, group {G}, {nl} clusters "
          f"(largest {sizes.max()})")
    print("# share f read a query | recall@100 | share of keys a step reads")
    for f in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5):
        rec, union = [], []
        for s in range(len(Q) // G):
            sel = np.zeros(nl, bool)
            for j in range(G):
                i = s * G + j
                m = np.searchsorted(np.cumsum(sizes[order[i]]), f * N) + 1
                own = np.zeros(nl, bool)
                own[order[i][:m]] = True
                sel |= own
                rec.append(own[a[top[i]]].mean())
            union.append(sizes[sel].sum() / N)
        print(f"{f:.2f} | {np.mean(rec):.3f} | {np.mean(union):.3f}")


if __name__ == "__main__":
    main()
