#!/usr/bin/env python3
"""bench/hf/bench_hf.py: the project's model in Hugging Face transformers with
attn_implementation 'sdpa' and 'ratd' (ratd.hf), the counterpart of ratd-lm-eval.

Teacher-forced, as ratd-lm-eval: prefill `--context` bytes of held-out text (once per
mode), then feed the next `--eval` bytes one at a time; the first prediction comes from
the prefill. Reports bits per byte (and on the `--repeat` spans, which are placed
exactly as ratd-lm-eval --repeat places them: same seed, same splitmix64), decode
tokens per second, the device memory of the KV cache (bytes the cache holds, and the
peak allocation during decode), ratd's counters; then generate() of `--gen` bytes
through both (greedy), tokens per second and where the two texts first differ.
A table on stdout, one JSON object per mode in --json FILE.

    python3 bench/hf/bench_hf.py --model bench/models/kjv-byte-llama \\
        --text bench/data/heldout-kjv.txt --context 15360 --eval 1024 --ratd build/daemon/ratd"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))

import torch  # noqa: E402
import transformers  # noqa: E402

import ratd  # noqa: E402
import ratd.hf as rhf  # noqa: E402

M64 = (1 << 64) - 1


def rng_next(state):
    """splitmix64, as bench/lm/eval.c's rng_next; state is a one-element list."""
    state[0] = (state[0] + 0x9E3779B97F4A7C15) & M64
    z = state[0]
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def make_repeats(text, C, E, N, sink, seed):
    """eval.c's make_repeats: N spans copied into [C, C+E) from >= 4096 bytes back."""
    slot = E // N
    if slot < 264:
        raise SystemExit("--repeat %d: eval %d leaves %d bytes per span, need >= 264" % (N, E, slot))
    ln = min(slot - 8, 1024)
    st = [(seed * 0x2545F4914F6CDD1D + 7) & M64]
    spans = []
    for i in range(N):
        dst = C + i * slot + 4 + rng_next(st) % (slot - ln - 7)
        if dst < 4096 + ln + sink:
            raise SystemExit("--repeat: context %d too short for a source >= 4096 bytes back" % C)
        hi, lo = dst - 4096 - ln, sink
        for _ in range(1000):
            src = lo + rng_next(st) % (hi - lo + 1)
            if all(not (src < s + l and s < src + ln) for s, _, l in spans):
                spans.append((src, dst, ln))
                break
        else:
            raise SystemExit("--repeat: no room for %d disjoint sources" % N)
        text[dst:dst + ln] = text[src:src + ln]
    return spans


def load(path, attn, dtype, device):
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except TypeError:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation=attn)
    return m.to(device).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def teacher_forced(model, tok, C, E, cache, device, is_rep):
    """nats of the E predictions after a prefill of C tokens; decode time; peak memory."""
    x = torch.tensor([tok[:C + E]], dtype=torch.long, device=device)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model(x[:, :C], past_key_values=cache, use_cache=True)
        sync(device)
        t_prefill = time.perf_counter() - t0
        cache = out.past_key_values
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        nats = [-lp[tok[C]].item()]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        for i in range(1, E):
            out = model(x[:, C + i - 1:C + i], past_key_values=cache, use_cache=True)
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            nats.append(-lp[tok[C + i]].item())
        sync(device)
        t_dec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else 0
    rep = [n for n, r in zip(nats, is_rep) if r]
    return {"bpb": sum(nats) / len(nats) / math.log(2),
            "bpb_rep": sum(rep) / len(rep) / math.log(2) if rep else None,
            "prefill_s": t_prefill, "decode_tok_s": (E - 1) / t_dec, "ms_per_token": 1e3 * t_dec / (E - 1),
            "kv_cache_bytes": rhf.kv_cache_bytes(cache), "decode_peak_extra_bytes": peak}


def generate(model, tok, C, n, device):
    x = torch.tensor([tok[:C]], dtype=torch.long, device=device)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        dt = time.perf_counter() - t0
    return out[0, C:].tolist(), dt


def spawn(binary):
    d = tempfile.mkdtemp(prefix="ratd-bench-hf-")
    ep = "ipc://%s/ratd.sock" % d
    log = open(os.path.join(d, "ratd.log"), "w")
    p = subprocess.Popen([binary, "--endpoint", ep], stdout=log, stderr=log)
    for _ in range(300):
        try:
            ratd.Client(ep, connect_timeout_ms=500).close()
            return p, ep
        except ratd.RatdError:
            if p.poll() is not None:
                break
            time.sleep(0.1)
    raise SystemExit("ratd did not start (%s)" % log.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", type=int, default=15360)
    ap.add_argument("--eval", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="sdpa,ratd")
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=500)
    ap.add_argument("--append-batch", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--index", default="pscan", choices=("graph", "flat", "ivf", "hnsw", "pscan"))
    ap.add_argument("--wait-index-ms", type=int, default=600000)
    ap.add_argument("--gen", type=int, default=256, help="bytes generate() makes (0: skip)")
    ap.add_argument("--endpoint")
    ap.add_argument("--ratd", help="start a private ratd from this binary")
    ap.add_argument("--json", metavar="FILE", help="also write one JSON object per mode to FILE")
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    text = bytearray(open(a.text, "rb").read())
    C, E = a.context, a.eval
    if len(text) < C + E:
        raise SystemExit("%s: %d bytes, need context + eval = %d" % (a.text, len(text), C + E))
    spans = make_repeats(text, C, E, a.repeat, a.sink, a.seed) if a.repeat else []
    is_rep = [False] * E
    for _, dst, ln in spans:
        for j in range(ln):
            is_rep[dst - C + j] = True
    tok = list(text[:C + E])
    proc = None
    ep = a.endpoint
    modes = a.modes.split(",")
    if "ratd" in modes and not ep:
        if not a.ratd:
            raise SystemExit("mode ratd needs --endpoint EP or --ratd BIN")
        proc, ep = spawn(a.ratd)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "ratd": ratd.__version__,
           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "dtype": a.dtype, "context": C, "eval": E, "repeat": a.repeat, "sink": a.sink,
           "window": a.window, "top_k": a.top_k, "append_batch": a.append_batch, "index": a.index}
    results, gens = [], {}
    try:
        for mode in modes:
            model = load(a.model, "sdpa" if mode == "sdpa" else "ratd", dtype, a.device)
            if mode == "ratd":
                rhf.enable(model, endpoint=ep, sink=a.sink, window=a.window, top_k=a.top_k,
                           append_batch=a.append_batch, n_train=a.n_train, index=a.index,
                           wait_index_ms=a.wait_index_ms)
                cache = rhf.RatdCache(model)
            else:
                cache = transformers.DynamicCache()
            r = teacher_forced(model, tok, C, E, cache, a.device, is_rep)
            r.update(mode=mode, **env)
            if mode == "ratd":
                st = cache.kv.stats
                r.update(attends=st["attends"], tokens_appended=st["tokens_appended"],
                         knn_s=round(st["knn_s"], 3), batched_attend=model._ratd.client.has_attend_batch())
                cache.close()
            del cache
            if a.gen:
                g, dt = generate(model, tok, C, a.gen, a.device)
                gens[mode] = g
                r.update(gen_bytes=a.gen, gen_tok_s=a.gen / dt,
                         gen_text=bytes(g).decode("latin-1"))
            results.append(r)
            del model
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    full = next((r for r in results if r["mode"] == "sdpa"), None)
    for r in results:
        if full and r is not full:
            r["vs_sdpa"] = r["bpb"] / full["bpb"] - 1
            if r["bpb_rep"] and full["bpb_rep"]:
                r["rep_vs_sdpa"] = r["bpb_rep"] / full["bpb_rep"] - 1
            if "sdpa" in gens and r["mode"] in gens:
                a_, b_ = gens["sdpa"], gens[r["mode"]]
                r["gen_first_diff"] = next((i for i, (x, y) in enumerate(zip(a_, b_)) if x != y), None)
    if a.json:
        with open(a.json, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print("# bench_hf: %s, transformers %s, torch %s, %s, %s, context %d, eval %d, sink %d, window %d, top_k %d"
          % (a.model, env["transformers"], env["torch"], env["device"], a.dtype, C, E, a.sink, a.window, a.top_k))
    print("| mode | bpb | vs sdpa | bpb_rep | tok/s (teacher-forced) | KV cache on device | decode peak extra | generate tok/s | first diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print("| %s | %.4f | %s | %s | %.1f | %.2f MiB | %.2f MiB | %s | %s |" % (
            r["mode"], r["bpb"], "%+.2f %%" % (100 * r["vs_sdpa"]) if "vs_sdpa" in r else "–",
            "%.4f" % r["bpb_rep"] if r["bpb_rep"] else "–", r["decode_tok_s"], r["kv_cache_bytes"] / 2**20,
            r["decode_peak_extra_bytes"] / 2**20, "%.1f" % r["gen_tok_s"] if "gen_tok_s" in r else "–",
            r.get("gen_first_diff", "–")))


if __name__ == "__main__":
    main()
