#!/usr/bin/env python3
"""PyTorch reference for `beft bench --step` (benches/compare/compare_gpu.sh).

The same work as beft's bias-only training step, in Hugging Face transformers
with random weights of the same shapes:

* decoders (OPTForCausalLM from an OPTConfig): causal-LM loss on every next
  token (`labels = input_ids`), no dropout (beft's decoders train without it;
  OPT's config has 0.1, which would add work beft does not do);
* encoders (BertForSequenceClassification, 2 labels, CLS pooler head): the
  classification loss, dropout 0.1.

`requires_grad` is set only on the chosen biases (`--bias v`: every
`v_proj.bias` / `attention.self.value.bias`; encoders also train the
classifier and the pooler's dense bias, as beft does), and one step is
forward + backward under bf16 autocast, global-norm clipping at 1.0 and an
AdamW step over those parameters. Attention is `attn_implementation="sdpa"`.
Frozen weights are held in bf16 (`--param-dtype bfloat16`, the counterpart
of beft's bf16 weights) or f32 (`--param-dtype float32`, classic mixed
precision); trainable biases are always f32.

Modes: `eager` and `compile` (torch.compile of the model). Timing: the median
step time after `--warmup` steps, with CUDA events on a GPU
(time.perf_counter on the CPU); memory: torch.cuda.max_memory_allocated over
model creation and the steps (peak RSS on the CPU).

    python3 benches/compare/pytorch_gpu.py --models opt-1.3b --batch 8 --seq 1024 --json out.json
    python3 benches/compare/pytorch_gpu.py --device cpu --tiny        # smoke test (seconds)
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

SHAPES = {
    # name: (kind, vocab, hidden, layers, heads, ffn, max_positions)
    "opt-tiny": ("decoder", 1000, 64, 2, 4, 256, 256),
    "opt-125m": ("decoder", 50272, 768, 12, 12, 3072, 2048),
    "opt-1.3b": ("decoder", 50272, 2048, 24, 32, 8192, 2048),
    "opt-6.7b": ("decoder", 50272, 4096, 32, 32, 16384, 2048),
    "bert-tiny": ("encoder", 1000, 64, 2, 4, 256, 256),
    "bert-base": ("encoder", 30522, 768, 12, 12, 3072, 512),
}

# beft's --bias terms -> which Hugging Face parameter names they select.
TERMS = {
    "decoder": {
        "q": lambda n: n.endswith("self_attn.q_proj.bias"),
        "k": lambda n: n.endswith("self_attn.k_proj.bias"),
        "v": lambda n: n.endswith("self_attn.v_proj.bias"),
        "o": lambda n: n.endswith("self_attn.out_proj.bias"),
        "mlp-in": lambda n: n.endswith(".fc1.bias"),
        "mlp-out": lambda n: n.endswith(".fc2.bias"),
        "ln1": lambda n: n.endswith("self_attn_layer_norm.bias"),
        "ln2": lambda n: ".layers." in n and n.endswith("final_layer_norm.bias"),
        "emb-ln": lambda n: n == "model.decoder.final_layer_norm.bias",
        "all": lambda n: n.endswith(".bias"),
    },
    "encoder": {
        "q": lambda n: n.endswith("attention.self.query.bias"),
        "k": lambda n: n.endswith("attention.self.key.bias"),
        "v": lambda n: n.endswith("attention.self.value.bias"),
        "o": lambda n: n.endswith("attention.output.dense.bias"),
        "mlp-in": lambda n: n.endswith("intermediate.dense.bias"),
        "mlp-out": lambda n: n.endswith("output.dense.bias") and "attention" not in n,
        "ln1": lambda n: n.endswith("attention.output.LayerNorm.bias"),
        "ln2": lambda n: n.endswith("output.LayerNorm.bias") and "attention" not in n,
        "emb-ln": lambda n: n.endswith("embeddings.LayerNorm.bias"),
        "all": lambda n: n.endswith(".bias"),
    },
}


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def trainable_names(model, kind, bias):
    terms = [t.strip() for t in bias.split(",") if t.strip()]
    for t in terms:
        if t not in TERMS[kind]:
            sys.exit(f"--bias: unknown term '{t}' (known: {', '.join(TERMS[kind])})")
    names = []
    for n, _ in model.named_parameters():
        keep = any(TERMS[kind][t](n) for t in terms)
        # beft always trains an encoder's classifier and its pooler's dense bias.
        if kind == "encoder" and (n.startswith("classifier.") or n == "bert.pooler.dense.bias"):
            keep = True
        if keep:
            names.append(n)
    return names


def build(name, device, param_dtype):
    import torch
    import transformers

    kind, vocab, hidden, layers, heads, ffn, maxpos = SHAPES[name]
    if kind == "decoder":
        cfg = transformers.OPTConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=maxpos,
            word_embed_proj_dim=hidden, do_layer_norm_before=True, dropout=0.0,
            attention_dropout=0.0, activation_function="relu", enable_bias=True,
            pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
        cls = transformers.OPTForCausalLM
    else:
        cfg = transformers.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=maxpos,
            num_labels=2,
        )
        cls = transformers.BertForSequenceClassification
    old = torch.get_default_dtype()
    torch.set_default_dtype(param_dtype)
    try:
        with torch.device(device):
            try:
                model = cls._from_config(cfg, attn_implementation="sdpa", dtype=param_dtype)
            except TypeError:
                model = cls._from_config(cfg, attn_implementation="sdpa", torch_dtype=param_dtype)
    finally:
        torch.set_default_dtype(old)
    return kind, cfg, model


def run_mode(args, name, mode, device):
    import torch

    param_dtype = getattr(torch, args.param_dtype)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    kind, cfg, model = build(name, device, param_dtype)
    model.train()
    names = set(trainable_names(model, kind, args.bias))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            p.data = p.data.float()
            params.append(p)
    if not params:
        sys.exit(f"--bias {args.bias}: no parameter of {name} matches")
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b, t = args.batch, args.seq
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (b, t), generator=g).to(device)
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    labels = (torch.arange(b) % 2).to(device)
    fwd = torch.compile(model) if mode == "compile" else model
    dev_type = "cuda" if cuda else "cpu"

    def step():
        opt.zero_grad(set_to_none=True)
        amp = (torch.autocast(device_type=dev_type, dtype=torch.bfloat16)
               if args.autocast == "bfloat16" else contextlib.nullcontext())
        with amp:
            if kind == "decoder":
                out = fwd(input_ids=ids, attention_mask=mask, labels=ids)
            else:
                out = fwd(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return out.loss

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            loss = step()
            dt = time.perf_counter() - t0
        losses.append(float(loss.detach().float().item()))
        if i >= args.warmup:
            times.append(dt)
    med = statistics.median(times)
    row = {
        "engine": "pytorch", "mode": mode, "model": name, "kind": kind, "device": device,
        "batch": b, "seq": t, "tokens_per_step": b * t, "bias": args.bias,
        "param_dtype": args.param_dtype, "trainable_params": sum(p.numel() for p in params),
        "warmup": args.warmup, "step_s": times, "step_s_median": med,
        "tokens_per_s": b * t / med, "first_loss": losses[0], "last_loss": losses[-1],
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": peak_rss(),
    }
    del fwd, model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--models", default="opt-1.3b", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--bias", default="v")
    ap.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"],
                    help="none: plain f32 (with --param-dtype float32), e.g. against beft's f32 CPU backend")
    ap.add_argument("--tiny", action="store_true",
                    help="opt-tiny and bert-tiny, batch 2 x 16 tokens, 3 steps, eager only (smoke test)")
    ap.add_argument("--json", default="", help="write the rows to this file")
    args = ap.parse_args()
    if args.tiny:
        args.models, args.batch, args.seq, args.steps, args.warmup = "opt-tiny,bert-tiny", 2, 16, 3, 1
        if args.modes == "eager,compile":
            args.modes = "eager"

    import torch
    import transformers

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in SHAPES:
            sys.exit(f"--models: unknown model '{m}' (known: {', '.join(SHAPES)})")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("eager", "compile"):
            sys.exit(f"--modes: unknown mode '{m}' (eager, compile)")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        if ":" in args.device:
            torch.cuda.set_device(torch.device(args.device))
        device_name = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device_name = "cpu (%d threads)" % torch.get_num_threads()
    rows = []
    for m in models:
        for mode in modes:
            try:
                row = run_mode(args, m, mode, args.device)
            except Exception as e:  # e.g. torch.compile without a compiler; keep the other rows
                row = {"engine": "pytorch", "mode": mode, "model": m, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            if "error" in row:
                print(f"{m} {mode}: FAILED {row['error']}", file=sys.stderr)
            else:
                mem = row["peak_device_bytes"] if row["peak_device_bytes"] is not None else row["peak_rss_bytes"]
                print(f"{m} {mode}: {row['batch']}x{row['seq']} median {row['step_s_median'] * 1e3:.1f} ms "
                      f"-> {row['tokens_per_s']:.0f} tokens/s, peak {mem / 2**20:.0f} MiB, "
                      f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}", file=sys.stderr)
    out = {
        "engine": "pytorch", "torch": torch.__version__, "transformers": transformers.__version__,
        "device": device_name, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "attn_implementation": "sdpa", "autocast": args.autocast, "rows": rows,
    }
    text = json.dumps(out, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    bad = [r for r in rows if "error" in r or not math.isfinite(r.get("last_loss", float("nan")))]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
