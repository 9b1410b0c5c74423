"""Integration test of the ctypes binding client/python/ratd.py against a real ratd:
starts $RATD_BIN on a private ipc:// endpoint, offloads and appends f32 tokens for a
GQA layer, checks attention (top_k = all) against exact attention in double precision,
the top-k positions of a flat index, the async form, the log-sum-exp merge with a local
part, errors as RatdError with the daemon's message, and stats. No numpy needed."""
import array
import math
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ["RA_SOURCE_DIR"], "client", "python"))
import ratd  # noqa: E402

H, G, D, N, NOFF = 4, 2, 16, 240, 200


def ref(q, K, V, rows, scale):
    s = [scale * sum(q[d] * K[r][d] for d in range(D)) for r in rows]
    m = max(s)
    w = [math.exp(x - m) for x in s]
    z = sum(w)
    o = [sum(w[i] * V[r][d] for i, r in enumerate(rows)) / z for d in range(D)]
    return o, m + math.log(z)


def head_major(rows_per_head, a, b):
    out = array.array("f")
    for g in range(G):
        for r in rows_per_head[g][a:b]:
            out.extend(r)
    return out


def main():
    rnd = random.Random(7)
    path = "/tmp/ratd-pytest-%d.sock" % os.getpid()
    ep = "ipc://" + path
    log = open("/tmp/ratd-pytest-%d.log" % os.getpid(), "w")
    proc = subprocess.Popen([os.environ["RATD_BIN"], "--endpoint", ep, "--workers", "2"],
                            stdout=log, stderr=log)
    try:
        c = None
        for _ in range(100):
            try:
                c = ratd.Client(ep, timeout_ms=300)
                info = c.hello()
                break
            except ratd.RatdError:
                c.close()
                c = None
                time.sleep(0.1)
        assert c is not None, "ratd did not answer"
        assert info["protocol_version"] == 1
        assert info["limits"]["max_top_k"] == 8192
        c.set_timeout(20000)

        K = [[[rnd.gauss(0, 1) for _ in range(D)] for _ in range(N)] for _ in range(G)]
        V = [[[rnd.gauss(0, 1) for _ in range(D)] for _ in range(N)] for _ in range(G)]
        # what the daemon stores is float32: round the reference the same way
        K = [[list(array.array("f", r)) for r in h] for h in K]
        V = [[list(array.array("f", r)) for r in h] for h in V]
        pos = array.array("q", [10 + 2 * i for i in range(N)])
        for kind in ("graph", "flat"):
            s = c.create_session(1, H, G, D, dtype="f32", index=kind)
            c.offload(s, 0, head_major(K, 0, NOFF), head_major(V, 0, NOFF), pos[:NOFF], G, D, "f32")
            c.append(s, 0, head_major(K, NOFF, N), head_major(V, NOFF, N), pos[NOFF:], G, D, "f32")
            q = array.array("f", [rnd.gauss(0, 1.5) for _ in range(H * D)])
            res = c.attend(s, 0, q, H, D, top_k=N)
            for h in range(H):
                g = h // (H // G)
                o, lse = ref(q[h * D:(h + 1) * D], K[g], V[g], range(N), 1 / math.sqrt(D))
                err = math.sqrt(sum((res["o"][h * D + d] - o[d]) ** 2 for d in range(D)))
                err /= math.sqrt(sum(x * x for x in o))
                assert err <= 1e-3, (kind, h, err)
                assert abs(res["lse"][h] - lse) <= 1e-3 * max(1, abs(lse)), (kind, h)
            if kind == "flat":
                k = 10
                res = c.attend(s, 0, q, H, D, top_k=k, want_topk=True)
                for h in range(H):
                    g = h // (H // G)
                    qs = q[h * D:(h + 1) * D]
                    sc = sorted(range(N), key=lambda r: -sum(qs[d] * K[g][r][d] for d in range(D)))
                    want = set(pos[r] for r in sc[:k])
                    got = set(res["pos"][h * k:(h + 1) * k])
                    assert got == want, (h, got, want)
                    assert res["counts"][h] == k
                # async: two in flight, waited in reverse order
                t1 = c.attend_send(s, 0, q, H, D, top_k=N)
                t2 = c.attend_send(s, 0, q, H, D, top_k=5)
                r2 = c.attend_wait(t2)
                r1 = c.attend_wait(t1)
                full = c.attend(s, 0, q, H, D, top_k=N)
                assert list(r1["o"]) == list(full["o"])
                assert list(r2["lse"]) != list(full["lse"])
                # merge: daemon part (first NOFF tokens only, new session) + local window
                s2 = c.create_session(1, H, G, D, dtype="f32", index="flat")
                c.offload(s2, 0, head_major(K, 0, NOFF), head_major(V, 0, NOFF), pos[:NOFF], G, D, "f32")
                part = c.attend(s2, 0, q, H, D, top_k=N)
                lo, ll = [], []
                for h in range(H):
                    g = h // (H // G)
                    o, lse = ref(q[h * D:(h + 1) * D], K[g], V[g], range(NOFF, N), 1 / math.sqrt(D))
                    lo.extend(o)
                    ll.append(lse)
                mo, ml = ratd.merge(part["o"], part["lse"], lo, ll, D)
                for i in range(H * D):
                    assert abs(mo[i] - full["o"][i]) <= 1e-3 * (1 + abs(full["o"][i])), i
                c.drop_session(s2)
            c.drop_session(s)
        try:
            c.drop_session(s)
            raise AssertionError("dropping twice must fail")
        except ratd.RatdError as e:
            assert e.name == "RA_ENOSESSION" and "no session" in e.message, e
        st = c.stats()
        assert st["ops"]["attend"]["count"] >= 6 and st["sessions"] == 0, st
        c.close()
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
        log.close()
    assert rc == 0, "ratd exit status %d" % rc
    assert not os.path.exists(path), "socket file left behind"
    os.unlink(log.name)
    print("test_python: all checks passed")


if __name__ == "__main__":
    main()
