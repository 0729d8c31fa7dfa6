#!/usr/bin/env python3
"""Load a beft export in Hugging Face PEFT / transformers and compare logits.

    peft_check.py --model BASE_DIR --adapter ADAPTER_DIR --logits LOGITS.json
    peft_check.py --merged MERGED_DIR --logits LOGITS.json

LOGITS.json is written by `beft eval --dump-logits` (input ids, token type ids,
attention mask and beft's logits for one batch). Exit status: 0 when the
logits agree within a relative error of 1e-4, 1 when they differ, 77 when
torch/transformers/peft are not installed (the reason is printed).
"""
import argparse
import json
import sys

try:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
except ImportError as e:  # pragma: no cover - environment dependent
    print(f"skipped: {e}")
    sys.exit(77)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--adapter")
    ap.add_argument("--merged")
    ap.add_argument("--logits", required=True)
    a = ap.parse_args()
    ref = json.load(open(a.logits))
    ids = torch.tensor(ref["input_ids"])
    tt = torch.tensor(ref["token_type_ids"])
    mask = torch.tensor(ref["attention_mask"])
    want = torch.tensor(ref["logits"], dtype=torch.float64)
    num_labels = want.shape[1]
    mean = ref.get("pooling") == "mean"
    kw = dict(attn_implementation="eager", dtype=torch.float32)

    if a.merged:
        if mean:
            sys.exit("merged mean-pooling models are checked through the adapter path")
        model = AutoModelForSequenceClassification.from_pretrained(a.merged, **kw)
    else:
        try:
            from peft import PeftModel
        except ImportError as e:
            print(f"skipped: {e}")
            sys.exit(77)
        if mean:
            base = AutoModel.from_pretrained(a.model, **kw)
        else:
            cfg = AutoConfig.from_pretrained(a.model, num_labels=num_labels)
            base = AutoModelForSequenceClassification.from_pretrained(a.model, config=cfg, **kw)
        model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    with torch.no_grad():
        inputs = dict(input_ids=ids, attention_mask=mask)
        if model.config.type_vocab_size > 1 if hasattr(model, "config") else True:
            inputs["token_type_ids"] = tt
        out = model(**inputs)
        if mean:
            from safetensors.torch import load_file

            head = load_file(f"{a.adapter}/head.safetensors")
            h = out.last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            got = pooled @ head["classifier.weight"].T + head["classifier.bias"]
        else:
            got = out.logits
    got = got.double()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    print(f"transformers {transformers.__version__}: logits max relative error {err:.2e}")
    sys.exit(0 if err <= 1e-4 else 1)


if __name__ == "__main__":
    main()
