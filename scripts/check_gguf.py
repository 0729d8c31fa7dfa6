#!/usr/bin/env python3
"""Reference values for beft's GGUF import, from independent Python implementations.

    python scripts/check_gguf.py fixtures [OUT_DIR]
        Write tests/fixtures/gguf/quants.gguf: for every block format beft decodes
        (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) a tensor
        "<type>" of seeded random blocks (scales set to finite f16 values) and a
        tensor "<type>.expected" (F32) with the values the `gguf` package's
        `gguf.quants.dequantize` decodes them to. Written with `gguf.GGUFWriter`,
        so the file also checks beft's parser against an independent writer.

    python scripts/check_gguf.py reference GGUF_FILE [OUT_JSON]
        Load a LLaMA-family GGUF with Hugging Face transformers (which dequantizes
        with the `gguf` package, maps names and undoes llama.cpp's Q/K rotary
        permutation itself) and record: token ids of fixed sentences, statistics
        and sampled values of a few weights under their Hugging Face names, the
        greedy continuation of a fixed prompt, and the perplexity of a fixed text.
        Default OUT_JSON: tests/fixtures/gguf/<stem>.reference.json.

Needs: numpy, gguf (pip install gguf); for `reference` also torch and transformers.
The tests in tests/gguf.rs compare beft against these files.
"""
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "gguf")

# Sentences whose token ids are recorded (plain text, digits, unicode, code,
# whitespace runs, special tokens).
SENTENCES = [
    "The capital of France is",
    "Hello world! How are you doing today?",
    "In 2023, 12,345 people visited the museum (about 3.5% more).",
    "naïve café déjà vu — “quotes” and emoji 🙂",
    "def f(x):\n    return x**2  # square\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "   leading and trailing spaces   ",
]
PROMPT = "The capital of France is"
GREEDY_TOKENS = 16
PPL_TEXT = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
    "and the clocks were striking thirteen. Paris is the capital and most populous city of France."
)
TENSORS = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.k_proj.bias",
    "model.layers.0.self_attn.v_proj.bias",
    "lm_head.weight",
]


def f16_bytes(rng, n, lo, hi):
    """n random finite f16 scales in [lo, hi) with random sign, as bytes."""
    v = rng.uniform(lo, hi, size=n) * rng.choice([-1.0, 1.0], size=n)
    return np.asarray(v, dtype=np.float16).view(np.uint8).reshape(n, 2)


def cmd_fixtures(out_dir):
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(20260611)
    w = gguf.GGUFWriter(os.path.join(out_dir, "quants.gguf"), arch="beft-test")
    w.add_string("beft.fixture", "random blocks and their gguf.quants.dequantize values")
    rows = 2
    for qt in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        cols = 256 if block == 256 else 64
        name = qt.name
        if qt in (T.F32, T.F16, T.BF16):
            vals = rng.normal(0.0, 1.5, size=(rows, cols)).astype(np.float32)
            if qt == T.F32:
                raw, expected = vals, vals
                w.add_tensor(name, raw)
            else:
                raw = gguf.quants.quantize(vals, qt)
                expected = gguf.quants.dequantize(raw, qt)
                w.add_tensor(name, raw, raw_dtype=qt)
        else:
            nblocks = rows * cols // block
            raw = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
            # Finite scales: f16 d (and m / dmin) at their places in the block.
            if qt in (T.Q4_0, T.Q5_0, T.Q8_0):
                raw[:, 0:2] = f16_bytes(rng, nblocks, 0.001, 0.1)
            elif qt in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K):
                raw[:, 0:2] = f16_bytes(rng, nblocks, 0.001, 0.1)
                raw[:, 2:4] = f16_bytes(rng, nblocks, 0.001, 0.1)
            elif qt == T.Q6_K:
                raw[:, 208:210] = f16_bytes(rng, nblocks, 0.001, 0.1)
            raw = raw.reshape(rows, cols // block * size)
            expected = gguf.quants.dequantize(raw, qt)
            w.add_tensor(name, raw, raw_dtype=qt)
        assert expected.shape == (rows, cols), (name, expected.shape)
        assert np.all(np.isfinite(expected)), name
        w.add_tensor(name + ".expected", np.ascontiguousarray(expected, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {os.path.join(out_dir, 'quants.gguf')}")


def cmd_reference(path, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    ref = {"file": f, "file_bytes": os.path.getsize(path), "tokens": [], "tensors": {}}
    for s in SENTENCES:
        ids = tok(s, add_special_tokens=True)["input_ids"]
        ref["tokens"].append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
    sd = model.state_dict()
    rng = np.random.default_rng(7)
    for name in TENSORS:
        if name not in sd:
            continue
        t = sd[name].detach().float().numpy()
        flat = t.reshape(-1)
        idx = sorted(set(int(i) for i in rng.integers(0, flat.size, size=16)))
        ref["tensors"][name] = {
            "shape": list(t.shape),
            "sum": float(flat.astype(np.float64).sum()),
            "sum_sq": float((flat.astype(np.float64) ** 2).sum()),
            "first": [float(x) for x in flat[:8]],
            "at": {str(i): float(flat[i]) for i in idx},
        }
    ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
            pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )
        new = gen.sequences[0].tolist()[len(ids):]
        # How decisive each greedy step was: top-1 minus top-2 logit.
        margins = []
        for sc in gen.scores:
            top2 = torch.topk(sc[0].double(), 2).values
            margins.append(float(top2[0] - top2[1]))
        ref["greedy"] = {
            "prompt": PROMPT, "prompt_ids": ids, "new_ids": new,
            "text": tok.decode(new), "max_new_tokens": GREEDY_TOKENS,
            "margins": margins,
        }
        pids = tok(PPL_TEXT, add_special_tokens=True)["input_ids"]
        logits = model(torch.tensor([pids])).logits[0]
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll = -logp[torch.arange(len(pids) - 1), torch.tensor(pids[1:])]
        ref["perplexity"] = {
            "text": PPL_TEXT, "ids": pids,
            "mean_nll": float(nll.mean()), "perplexity": float(math.exp(nll.mean())),
            "note": "mean next-token NLL over positions 1..n-1 (no BOS), f32 model from transformers",
        }
        first = logits[:4].double()
        ref["logits_head"] = {
            "ids": pids[:4],
            "top5": [torch.topk(r, 5).indices.tolist() for r in first],
            "first8": [[float(x) for x in r[:8]] for r in first],
        }
    ref["generated_by"] = "scripts/check_gguf.py reference (transformers GGUF loader)"
    with open(out, "w") as fh:
        json.dump(ref, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {out}")
    print("greedy:", repr(ref["greedy"]["text"]))
    print("perplexity:", ref["perplexity"]["perplexity"])


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "fixtures":
        out = sys.argv[2] if len(sys.argv) > 2 else FIXTURES
        os.makedirs(out, exist_ok=True)
        cmd_fixtures(out)
    elif len(sys.argv) >= 3 and sys.argv[1] == "reference":
        path = sys.argv[2]
        stem = os.path.splitext(os.path.basename(path))[0]
        out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(FIXTURES, f"{stem}.reference.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        cmd_reference(path, out)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
