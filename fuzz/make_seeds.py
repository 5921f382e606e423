#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/ (committed; rerun to regenerate).

Valid files of every format plus a few near-misses, so that the fuzzers start
from deep inside each parser. The tokenizer seed is a tiny sentencepiece
model trained with Debian's spm_train (skipped when it is not installed).
"""
import json, os, shutil, struct, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, off, buf = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        buf += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + buf


def fnv1a64(data, h=0xCBF29CE484222325):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def shard(docs, vocab, token_bytes=2):
    toks, offs = [], [0]
    for d in docs:
        toks += d + [1]
        offs.append(len(toks))
    fmt = "<H" if token_bytes == 2 else "<I"
    tb = b"".join(struct.pack(fmt, t) for t in toks)
    tb += b"\0" * ((8 - len(tb) % 8) % 8)
    ob = b"".join(struct.pack("<Q", o) for o in offs)
    checksum = fnv1a64(ob, fnv1a64(tb[: len(toks) * token_bytes]))
    head = b"MOECPTSH" + struct.pack("<IIIIQQQ", 1, token_bytes, vocab, 0, len(toks), len(docs), checksum)
    head += struct.pack("<Q", fnv1a64(head)) + b"\0" * 8
    return head + tb + ob


def main():
    shutil.rmtree(os.path.join(HERE, "corpus"), ignore_errors=True)
    f32 = lambda *v: struct.pack("<%df" % len(v), *v)
    out("safetensors", "two_tensors", safetensors(
        [("w", "F32", [2, 2], f32(1, 2, 3, 4)), ("b", "BF16", [2], b"\x80\x3f\x00\x40")], {"format": "moecpt"}))
    out("safetensors", "all_dtypes", safetensors(
        [("f64", "F64", [1], b"\0" * 8), ("f16", "F16", [1], b"\0\x3c"), ("i64", "I64", [1], b"\1" + b"\0" * 7),
         ("i32", "I32", [1], b"\2\0\0\0"), ("i16", "I16", [1], b"\3\0"), ("i8", "I8", [1], b"\xff"),
         ("u8", "U8", [1], b"\x07"), ("bool", "BOOL", [2], b"\0\1"), ("empty", "F32", [0, 3], b"")]))
    out("safetensors", "scalar_nullmeta", safetensors([("s", "F32", [], f32(7))], None).replace(b"{", b'{"__metadata__":null,', 1))
    out("safetensors", "empty_header", struct.pack("<Q", 8) + b"{}      ")

    out("shard", "u16", b"\0" + shard([[2, 3, 4], [5], []], 64))
    out("shard", "u32", b"\0" + shard([[70000, 2], [3, 4, 5, 6]], 70001, 4))
    out("shard", "empty", b"\0" + shard([], 8))

    for sub in ("mini", "paper"):
        for name in sorted(os.listdir(os.path.join(ROOT, "recipes", sub))):
            if name.endswith(".toml"):
                out("config", sub + "-" + name, open(os.path.join(ROOT, "recipes", sub, name)).read())
    out("config", "moe", '[model]\nffn = "moe"\nn_experts = 4\ntop_k = 2\nexpert_hidden = 16\n'
        '[router]\ntype = "sinkhorn"\n[schedule]\ntype = "infinite"\n[data]\ntrain = ["en", "de"]\n'
        'train_weights = [1, 2.5]\nreplay = ["en"]\nreplay_fraction = 0.3\n[train]\nsteps = 10\n')
    out("config", "empty", "")

    out("documents", "corpus", '{"id": "a", "text": "hello world"}\n{"text": "no id \\u00e9\\n"}\n\n'
        '{"id": "b", "text": "line\\twith\\ttabs", "extra": [1, 2]}\n')

    spm = shutil.which("spm_train")
    if spm:
        with tempfile.TemporaryDirectory() as tmp:
            text = os.path.join(tmp, "t.txt")
            with open(text, "w") as f:
                for i in range(200):
                    f.write("the quick brown fox %d jumps over the lazy dog\ndef f(x): return x\n" % i)
            for kind in ("bpe", "unigram"):
                subprocess.run([spm, "--input=" + text, "--model_prefix=" + os.path.join(tmp, kind),
                                "--vocab_size=60", "--model_type=" + kind, "--byte_fallback=false",
                                "--minloglevel=2", "--normalization_rule_name=identity"], check=True, capture_output=True)
                out("tokenizer", kind + ".model", open(os.path.join(tmp, kind + ".model"), "rb").read())
    else:
        print("spm_train not found: no tokenizer seeds", file=sys.stderr)


if __name__ == "__main__":
    main()


def hand_made_regressions():
    """Hostile files written by hand (fuzz/regressions/<reader>/hand-*); every one
    must give a clean moecpt::Error naming the file (tests/test_hostile_inputs.cpp)."""
    def reg(target, name, data):
        d = os.path.join(HERE, "regressions", target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "hand-" + name), "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())

    def st(header_obj, data=b""):
        h = json.dumps(header_obj).encode()
        return struct.pack("<Q", len(h)) + h + data

    reg("safetensors", "header-length-past-eof", struct.pack("<Q", 1000) + b'{"a":1}')
    reg("safetensors", "header-length-absurd", struct.pack("<Q", 1 << 62) + b"{}")
    reg("safetensors", "overlapping-offsets", st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12))
    reg("safetensors", "offsets-out-of-bounds", st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 8))
    reg("safetensors", "bad-dtype", st({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16))
    reg("safetensors", "huge-shape", st({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4))
    reg("safetensors", "shape-times-dtype-overflows", st({"a": {"dtype": "F64", "shape": [1 << 61], "data_offsets": [0, 8]}}, b"\0" * 8))
    reg("safetensors", "negative-dim", st({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4))
    reg("safetensors", "nesting-bomb", struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000)
    reg("safetensors", "bool-byte-2", st({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\1\2"))
    reg("safetensors", "trailing-bytes", st({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0"))

    good = shard([[2, 3, 4], [5]], 64)
    reg("shard", "truncated", good[:-8])
    bad = bytearray(good)
    bad[24:32] = struct.pack("<Q", 1 << 60)  # n_tokens absurd, header checksum repaired
    bad[48:56] = struct.pack("<Q", fnv1a64(bytes(bad[:48])))
    reg("shard", "absurd-token-count", bytes(bad))
    bad = bytearray(good)
    bad[12:16] = struct.pack("<I", 3)  # token width 3
    bad[48:56] = struct.pack("<Q", fnv1a64(bytes(bad[:48])))
    reg("shard", "token-width-3", bytes(bad))
    reg("shard", "token-id-past-vocab", shard([[2, 3, 70]], 64))
    reg("shard", "not-a-shard", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)

    reg("config", "invalid-toml", "[model\nd_model = 3\n")
    reg("config", "integer-overflow", "[model]\nd_model = 99999999999999999999999\n")
    reg("config", "wrong-type", "[train]\nsteps = \"many\"\n")
    reg("config", "unknown-key", "[model]\nd_modle = 64\n")
    reg("config", "nan", "[optim]\nlr = nan\n")
    reg("config", "deep-inline-tables", "a = " + "{b = " * 300 + "1" + "}" * 300 + "\n")

    reg("documents", "invalid-json", '{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    reg("documents", "text-not-string", '{"id": "a", "text": 5}\n')
    reg("documents", "empty", "\n\n")

    reg("tokenizer", "garbage", b"\x0a\xff\xff\xff\xff\x0f" + b"\x01" * 64)
    reg("tokenizer", "empty", b"")


if __name__ == "__main__" and "--regressions" in sys.argv:
    hand_made_regressions()
