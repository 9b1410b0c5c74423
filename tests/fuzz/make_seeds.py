#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz (corpus/<target>/): a few valid and near-valid
inputs per fuzz target, small files. Run once from this folder when a format changes;
the outputs are committed. Protobuf is encoded by hand (the wire schema is proto/ratd.proto)
so that this needs nothing beyond Python's standard library."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# ---- protobuf, by hand -------------------------------------------------------------
def varint(x):
    b = bytearray()
    while True:
        c = x & 0x7F
        x >>= 7
        if x:
            b.append(c | 0x80)
        else:
            b.append(c)
            return bytes(b)

def fv(field, x):  # varint field
    return varint(field << 3) + varint(x)

def fl(field, data):  # length-delimited field
    return varint(field << 3 | 2) + varint(len(data)) + data

def ff32(field, x):
    return varint(field << 3 | 5) + struct.pack("<f", x)

def packed(field, xs):
    return fl(field, b"".join(varint(x) for x in xs))

def tensor(role, dtype, shape):
    return fv(1, role) + fv(2, dtype) + packed(3, shape)

def header(typ, rid=1, session=0, layer=0, tensors=(), create=None, attend=None):
    h = fv(1, 1) + fv(2, rid) + fv(3, typ)
    if session:
        h += fv(4, session)
    if layer:
        h += fv(5, layer)
    for t in tensors:
        h += fl(6, tensor(*t))
    if create is not None:
        h += fl(10, create)
    if attend is not None:
        h += fl(11, attend)
    return h

def frames(fs):
    """fuzz_proto's layout: count byte, 2-byte lengths of all frames but the last."""
    b = bytearray([len(fs)])
    for i, f in enumerate(fs):
        if i + 1 < len(fs):
            b += struct.pack("<H", len(f))
        b += f
    return bytes(b)

F32, F16, BF16, I64, I32 = 0, 1, 2, 3, 4
K, V, POS, QTR, Q = 1, 2, 3, 4, 5
HELLO, CREATE, OFFLOAD, APPEND, ATTEND, DROP, STATS = 1, 2, 3, 4, 5, 6, 7

out("proto", "hello", frames([header(HELLO)]))
cs = fv(1, 2) + fv(2, 4) + fv(3, 2) + fv(4, 8) + fv(5, F16) + fl(6, fv(1, 0) + fv(2, 16) + fv(10, 7))
out("proto", "create", frames([header(CREATE, create=cs)]))
att = fv(1, 16) + ff32(3, 0.35) + fv(4, 1)
out("proto", "attend", frames([header(ATTEND, 3, 1, 1, [(Q, F32, [4, 8])], attend=att), bytes(128)]))
att_b = fv(1, 16) + packed(5, [16, 0, 4, 8]) + packed(6, [1, 2])
out("proto", "attend_batch",
    frames([header(ATTEND, 4, 1, 0, [(Q, F32, [2, 4, 8])], attend=att_b), bytes(256)]))
off = [(K, F16, [1, 4, 8]), (V, F16, [1, 4, 8]), (POS, I64, [4]), (QTR, F32, [2, 2, 8])]
out("proto", "offload", frames([header(OFFLOAD, 5, 1, 0, off), bytes(64), bytes(64),
                                struct.pack("<4q", 0, 1, 2, 3), bytes(128)]))
out("proto", "stats_session", frames([header(STATS, 6, 1)]))
# near-valid: a frame one byte short, a missing frame, garbage, too many frames
out("proto", "short_frame", frames([header(ATTEND, 7, 1, 0, [(Q, F32, [4, 8])], attend=att), bytes(127)]))
out("proto", "missing_frame", frames([header(APPEND, 8, 1, 0, off[:2]), bytes(64)]))
out("proto", "garbage", frames([b"\xff\xff\xff\xff\x0fnot a header"]))
out("proto", "many_frames", frames([header(HELLO)] + [b"x"] * 17))
out("proto", "five_dims", frames([header(ATTEND, 9, 1, 0, [(Q, F32, [1, 1, 1, 4, 8])]), bytes(128)]))

# ---- safetensors ---------------------------------------------------------------------
def safetensors(tensors, meta=None, pad=True):
    """tensors: list of (name, dtype, shape, bytes)"""
    hdr, data = {}, b""
    if meta is not None:
        hdr["__metadata__"] = meta
    for name, dt, shape, raw in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(hdr, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data

def f32(n, v=0.5):
    return struct.pack("<%df" % n, *([v] * n))

def f16(n):
    return struct.pack("<%de" % n, *([0.25] * n))

out("safetensors", "three_dtypes", safetensors([
    ("a", "F32", [2, 3], f32(6)), ("b", "F16", [4], f16(4)), ("c", "BF16", [2, 2], b"\x80\x3f" * 4)],
    meta={"format": "pt"}))
out("safetensors", "scalar_and_empty", safetensors([("s", "F32", [], f32(1)), ("e", "F16", [0, 4], b"")]))
hdr = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'
out("safetensors", "overlap", struct.pack("<Q", len(hdr)) + hdr + f32(3))
out("safetensors", "truncated", safetensors([("a", "F32", [4, 4], f32(16))])[:-5])
out("safetensors", "bad_dtype", safetensors([("a", "I8", [4], b"\x01" * 4)]))
hdr = b'{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}'
out("safetensors", "huge_shape", struct.pack("<Q", len(hdr)) + hdr + f32(2))
out("safetensors", "escapes", safetensors([("w\\u00e9ight\\ud83d\\ude00", "F32", [1], f32(1))]).replace(b"\\\\", b"\\"))

# ---- a tiny model directory: config.json NUL model.safetensors -----------------------
cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
       "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
       "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "hidden_act": "silu", "tie_word_embeddings": True}
H, QD, KD, F, Vb = 8, 8, 4, 16, 8
def model_tensors(tied=True):
    t = [("model.embed_tokens.weight", "F16", [Vb, H], f16(Vb * H)),
         ("model.norm.weight", "F32", [H], f32(H, 1.0))]
    if not tied:
        t.append(("lm_head.weight", "BF16", [Vb, H], b"\x80\x3f" * (Vb * H)))
    p = "model.layers.0."
    t += [(p + "input_layernorm.weight", "F32", [H], f32(H, 1.0)),
          (p + "self_attn.q_proj.weight", "F16", [QD, H], f16(QD * H)),
          (p + "self_attn.k_proj.weight", "F16", [KD, H], f16(KD * H)),
          (p + "self_attn.v_proj.weight", "F16", [KD, H], f16(KD * H)),
          (p + "self_attn.o_proj.weight", "F16", [H, QD], f16(H * QD)),
          (p + "post_attention_layernorm.weight", "F32", [H], f32(H, 1.0)),
          (p + "mlp.gate_proj.weight", "F16", [F, H], f16(F * H)),
          (p + "mlp.up_proj.weight", "F16", [F, H], f16(F * H)),
          (p + "mlp.down_proj.weight", "F16", [H, F], f16(H * F))]
    return t
def model(c, tensors):
    return json.dumps(c).encode() + b"\0" + safetensors(tensors)
out("lm_model", "tiny_tied", model(cfg, model_tensors()))
c2 = dict(cfg, tie_word_embeddings=False,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
out("lm_model", "tiny_llama3", model(c2, model_tensors(tied=False)))
c3 = dict(cfg)
del c3["rope_theta"]
c3["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
out("lm_model", "tiny_rope_parameters", model(c3, model_tensors()))
out("lm_model", "missing_tensor", model(cfg, model_tensors()[:-1]))
out("lm_model", "wrong_shape", model(dict(cfg, intermediate_size=12), model_tensors()))
out("lm_model", "bad_config", b'{"model_type":"llama","vocab_size":8,"hidden_size":' + b"\0")

# ---- trace ------------------------------------------------------------------------------
def trace(dtype, L, Hq, G, D, n, pos0=0, version=1):
    es = 4 if dtype == 0 else 2
    h = b"RATRACE\0" + struct.pack("<IIIIIIIIfI", version, dtype, L, Hq, G, D, n, pos0, 10000.0, 0) + bytes(16)
    return h + bytes(L * (Hq + 2 * G) * n * D * es)
out("trace", "f16_small", trace(1, 1, 2, 1, 4, 3))
out("trace", "f32_two_layers", trace(0, 2, 2, 2, 2, 2, pos0=5))
out("trace", "bf16_gqa", trace(2, 1, 4, 2, 2, 1))
out("trace", "size_off", trace(1, 1, 2, 1, 4, 3)[:-2])
out("trace", "bad_version", trace(1, 1, 2, 1, 4, 3, version=2))
out("trace", "not_gqa", trace(0, 1, 3, 2, 2, 1))

# ---- npy --------------------------------------------------------------------------------
def npy(descr, shape, nbytes, version=1, fortran=False):
    d = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, "True" if fortran else "False", shape)
    pre = 10 if version == 1 else 12
    hl = (len(d) + 1 + pre + 63) // 64 * 64 - pre
    h = (d + " " * (hl - len(d) - 1) + "\n").encode()
    if version == 1:
        head = b"\x93NUMPY\x01\x00" + struct.pack("<H", hl)
    else:
        head = b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", hl)
    return head + h + bytes(nbytes)
out("npy", "f4_3x4", npy("<f4", "(3, 4)", 48))
out("npy", "f2_2x2", npy("<f2", "(2, 2)", 8))
out("npy", "v2_f4", npy("<f4", "(1, 8)", 32, version=2))
out("npy", "v3_f2", npy("<f2", "(4, 1)", 8, version=3))
out("npy", "fortran", npy("<f4", "(2, 2)", 16, fortran=True))
out("npy", "one_dim", npy("<f4", "(4,)", 16))
out("npy", "short_data", npy("<f4", "(3, 4)", 40))
out("npy", "big_endian", npy(">f4", "(2, 2)", 16))
