#!/usr/bin/env python3
"""PyTorch CPU baseline for beft's step benchmark (benches/compare/compare_cpu.sh).

The same work as `cargo run --release --example step_bench`: a BERT encoder
(Hugging Face transformers, default attention implementation) with masked
mean pooling and a linear classifier; in `train` mode one step is forward +
backward with requires_grad only on the value-projection biases and the
classifier (beft's `--bias v`), dropout on, global-norm clipping at 1.0 and
an AdamW step; in `eval` mode one step is a no-grad forward pass.
`--autocast bf16` runs the forward under `torch.autocast("cpu",
dtype=torch.bfloat16)` (the counterpart of beft's `BEFT_CPU_GEMM=bf16`).

Prints one JSON line: tokens/s from the median step time, and the peak
resident memory (VmHWM) of this process.
"""

import argparse
import json
import os
import statistics
import time


def vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    ap.add_argument("--model", default="", help="HF model directory (real weights); random weights if empty")
    ap.add_argument("--mode", choices=["train", "eval"], default="train")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if args.model:
        enc = BertModel.from_pretrained(args.model, add_pooling_layer=False)
    else:
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, **SHAPES[args.shape])
        enc = BertModel(cfg, add_pooling_layer=False)
    d = enc.config.hidden_size
    head = torch.nn.Linear(d, 2)
    for p in enc.parameters():
        p.requires_grad_(False)
    trainable = [head.weight, head.bias]
    for layer in enc.encoder.layer:
        b = layer.attention.self.value.bias
        b.requires_grad_(True)
        trainable.append(b)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    g = torch.Generator().manual_seed(1)
    bsz, t = args.batch, args.seq
    ids = torch.randint(1000, 21000, (bsz, t), generator=g)
    mask = torch.ones(bsz, t, dtype=torch.long)
    labels = torch.arange(bsz) % 2
    maskf = mask.unsqueeze(-1).float()

    def logits_of():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (h * maskf).sum(1) / maskf.sum(1).clamp(min=1e-9)
            return head(pooled).float()

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(logits_of(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return loss.item()

    def eval_step():
        with torch.inference_mode():
            return logits_of()

    if args.mode == "train":
        enc.train()
        head.train()
        step = train_step
    else:
        enc.eval()
        head.eval()
        step = eval_step
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "engine": "pytorch",
                "torch": torch.__version__,
                "attn": getattr(enc.config, "_attn_implementation", "?"),
                "autocast": args.autocast,
                "shape": args.shape,
                "weights": "real" if args.model else "random",
                "mode": args.mode,
                "batch": bsz,
                "seq": t,
                "threads": torch.get_num_threads(),
                "step_s_median": med,
                "step_s": times,
                "cpu_s": cpu,
                "tokens_per_s": bsz * t / med,
                "peak_rss_bytes": vm_hwm_bytes(),
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    main()
