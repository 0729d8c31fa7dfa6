#!/usr/bin/env python3
"""Generate the Hugging Face parity fixtures for beft's tests.

What it writes
--------------
One directory per case under ``tests/fixtures/<case>/`` (a few tens of KB each,
well under 1 MB in total), plus ``tests/fixtures/README.md``:

    <case>/model/config.json          Hugging Face config of a tiny random model
    <case>/model/model.safetensors    its weights (float32; bfloat16 for bert_cls_bf16;
                                      two shards + index for bert_cls_sharded)
    <case>/expected.safetensors       inputs, labels, logits, loss, intermediate
                                      activations and the gradient of every trainable
                                      parameter, computed in float64 by transformers

Cases: bert_cls, bert_pair_regression, roberta_cls, bert_mean, bert_cls_bf16,
bert_cls_sharded (see CASES below and tests/fixtures/README.md).

The weights are random but deliberately "loud": every Linear/Embedding weight is
drawn with std 0.2, every bias is randn * 0.1 and every LayerNorm weight is
1 + randn * 0.1, so no bias is zero and no LayerNorm is the identity. The
expected values are computed in float64 (eval mode, dropout off) from exactly the
weights written to disk (rounded to float32, or to bfloat16, first). Only bias
vectors and the classifier head's output weight get gradients.

The script checks itself: every saved model is reloaded from disk into a fresh
model and the logits, loss and gradients are recomputed and compared with
expected.safetensors.

How to run (CPU only, a few seconds)
------------------------------------
    pip install -r scripts/requirements-fixtures.txt && python scripts/make_fixtures.py

Run it from anywhere; paths are relative to the repository root. Output is
deterministic (fixed seeds) for a given torch / transformers version.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import safetensors
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures"

# Tiny architecture shared by every case.
TINY = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    initializer_range=0.02,
    type_vocab_size=2,
)

BATCH = 3
SEQ = 7
LENGTHS = [7, 5, 3]  # real tokens per row; the rest is right padding
CLS_ID = 2  # first token of every row
WEIGHT_STD = 0.2  # Linear / Embedding weights
PERTURB_STD = 0.1  # biases, LayerNorm weights (around 1) and biases (around 0)

# name -> description. Seeds differ per case so that editing one case does not
# change the others; bert_cls_bf16 / bert_cls_sharded reuse bert_cls's seed on
# purpose (same weights and inputs).
CASES = {
    "bert_cls": dict(arch="bert", num_labels=3, loss="ce", pooling="cls", pair=False, seed=1001),
    "bert_pair_regression": dict(arch="bert", num_labels=1, loss="mse", pooling="cls", pair=True, seed=1002),
    "roberta_cls": dict(arch="roberta", num_labels=2, loss="ce", pooling="cls", pair=False, seed=1003),
    "bert_mean": dict(arch="bert_st", num_labels=2, loss="ce", pooling="mean", pair=False, seed=1004),
    "bert_cls_bf16": dict(arch="bert", num_labels=3, loss="ce", pooling="cls", pair=False, seed=1001,
                          store_dtype="bfloat16"),
    "bert_cls_sharded": dict(arch="bert", num_labels=3, loss="ce", pooling="cls", pair=False, seed=1001,
                             shards=2),
}

ST_POOLING_CONFIG = {
    "word_embedding_dimension": TINY["hidden_size"],
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
}

ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


# --------------------------------------------------------------------------- models


class MeanPoolClassifier(nn.Module):
    """Sentence-transformers style model: BertModel -> masked mean -> Linear.

    Parameter names are the BertModel's own (no "bert." prefix) plus
    classifier.weight / classifier.bias, exactly as written to model.safetensors.
    """

    def __init__(self, bert: BertModel, num_labels: int):
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)

    def flat_named_parameters(self):
        """(file name, parameter) pairs: BertModel names without prefix, then the head."""
        for n, p in self.bert.named_parameters():
            yield n, p
        for n, p in self.classifier.named_parameters():
            yield "classifier." + n, p

    def state_for_file(self) -> dict[str, torch.Tensor]:
        sd = dict(self.bert.state_dict())
        sd["classifier.weight"] = self.classifier.weight
        sd["classifier.bias"] = self.classifier.bias
        return sd

    def forward(self, input_ids, attention_mask, token_type_ids, output_hidden_states=False):
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.classifier(pooled), out.hidden_states


def make_config(case: dict):
    kw = dict(TINY)
    num_labels = case["num_labels"]
    problem_type = "regression" if case["loss"] == "mse" else "single_label_classification"
    if case["arch"] == "roberta":
        kw.update(
            max_position_embeddings=TINY["max_position_embeddings"] + 2,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        return RobertaConfig(num_labels=num_labels, problem_type=problem_type, **kw)
    kw.update(pad_token_id=0)
    return BertConfig(num_labels=num_labels, problem_type=problem_type, **kw)


def build_model(case: dict, config):
    """Fresh model with eager attention (no SDPA)."""
    if case["arch"] == "roberta":
        return RobertaForSequenceClassification._from_config(config, attn_implementation="eager")
    if case["arch"] == "bert":
        return BertForSequenceClassification._from_config(config, attn_implementation="eager")
    bert = BertModel._from_config(config, attn_implementation="eager", add_pooling_layer=True)
    return MeanPoolClassifier(bert, case["num_labels"])


def file_named_parameters(model):
    """(name as stored in model.safetensors, parameter)."""
    if isinstance(model, MeanPoolClassifier):
        return list(model.flat_named_parameters())
    return list(model.named_parameters())


def randomize_(model, gen: torch.Generator):
    """Overwrite HF's init so that biases and LayerNorms are far from 0 / 1."""
    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * WEIGHT_STD)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.add_(torch.randn(mod.bias.shape, generator=gen) * PERTURB_STD)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=gen) * PERTURB_STD)
                mod.bias.add_(torch.randn(mod.bias.shape, generator=gen) * PERTURB_STD)
    for name, p in file_named_parameters(model):
        if name.endswith(".bias"):
            assert bool((p != 0).all()), f"{name} has an exact zero"


def round_weights_(model, store_dtype: torch.dtype):
    """Round every parameter to the on-disk dtype, then hold it in float64."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(p.to(store_dtype).to(p.dtype))
    model.double()


def trainable_names(case: dict, model) -> list[str]:
    """Biases (that influence the loss) plus the classifier head's output weight."""
    head_weight = "classifier.out_proj.weight" if case["arch"] == "roberta" else "classifier.weight"
    names = []
    for name, _ in file_named_parameters(model):
        if case["pooling"] == "mean" and name.startswith("pooler."):
            continue  # pooler exists in the file but is unused with mean pooling
        if name.endswith(".bias") or name == head_weight:
            names.append(name)
    return names


# --------------------------------------------------------------------------- inputs


def make_inputs(case: dict, config, gen: torch.Generator):
    pad = config.pad_token_id
    ids = torch.full((BATCH, SEQ), pad, dtype=torch.int32)
    mask = torch.zeros((BATCH, SEQ), dtype=torch.int32)
    tt = torch.zeros((BATCH, SEQ), dtype=torch.int32)
    for b, n in enumerate(LENGTHS):
        ids[b, :n] = torch.randint(3, config.vocab_size, (n,), generator=gen, dtype=torch.int32)
        ids[b, 0] = CLS_ID
        mask[b, :n] = 1
        if case["pair"]:
            first = (n + 1) // 2  # segment A = first half (with CLS), segment B = the rest
            tt[b, first:n] = 1
    assert bool((ids[mask == 1] != pad).all())
    if case["loss"] == "mse":
        labels = torch.randn((BATCH,), generator=gen).to(torch.float32)
    else:
        labels = torch.randint(0, case["num_labels"], (BATCH,), generator=gen, dtype=torch.int32)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)


# --------------------------------------------------------------------------- compute


def run_model(case: dict, model, inputs: dict, dtype: torch.dtype = torch.float64):
    """Forward + loss in `dtype`. Returns logits, loss, hidden states, pooled vector
    (the input of the final Linear layer)."""
    ids = inputs["input_ids"].long()
    mask = inputs["attention_mask"].long()
    tt = inputs["token_type_ids"].long()

    final = model.classifier.out_proj if case["arch"] == "roberta" else model.classifier
    captured = {}
    hook = final.register_forward_pre_hook(lambda _m, args: captured.__setitem__("pooled", args[0]))
    try:
        if isinstance(model, MeanPoolClassifier):
            logits, hidden = model(ids, mask, tt, output_hidden_states=True)
            hf_loss = None
        else:
            labels = inputs["labels"]
            labels = labels.to(dtype) if case["loss"] == "mse" else labels.long()
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                        output_hidden_states=True)
            logits, hidden, hf_loss = out.logits, out.hidden_states, out.loss
    finally:
        hook.remove()

    # Our own loss definition (what the engine implements); cross-check HF's.
    if case["loss"] == "mse":
        loss = F.mse_loss(logits.squeeze(-1), inputs["labels"].to(dtype))
    else:
        loss = F.cross_entropy(logits, inputs["labels"].long())
    if hf_loss is not None:
        assert torch.allclose(loss, hf_loss, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6), (
            loss, hf_loss)
    return logits, loss, hidden, captured["pooled"]


def compute_expected(case: dict, model, inputs: dict, names: list[str]) -> dict[str, torch.Tensor]:
    model.eval()
    params = dict(file_named_parameters(model))
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for n in names:
        params[n].requires_grad_(True)

    logits, loss, hidden, pooled = run_model(case, model, inputs)
    loss.backward()

    exp = {k: v.contiguous() for k, v in inputs.items()}
    exp["logits"] = logits.detach().float()
    exp["loss"] = loss.detach().float().reshape(1)
    exp["pooled"] = pooled.detach().float()
    for i, h in enumerate(hidden):
        exp[f"hidden_states.{i}"] = h.detach().float()
    for n in names:
        g = params[n].grad
        assert g is not None, f"no gradient reached {n}"
        if n.endswith(".attention.self.key.bias"):
            # Adding b_k shifts every score of a query row by the same q.b_k, which
            # softmax ignores: this gradient is zero in exact arithmetic (HF's
            # float64 value is rounding noise, ~1e-17).
            assert bool(g.abs().max() < 1e-12), f"gradient of {n} should vanish"
        else:
            assert bool(g.abs().max() > 1e-6), f"gradient of {n} is (nearly) zero"
        exp[f"grad.{n}"] = g.detach().float().contiguous()
    # Nothing outside the trainable set received a gradient.
    for n, p in params.items():
        if n not in names:
            assert p.grad is None, n
    return exp


# --------------------------------------------------------------------------- writing


def to_store_dtype(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def write_model(case: dict, model, model_dir: Path, store_dtype: torch.dtype):
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)

    if isinstance(model, MeanPoolClassifier):
        cfg = model.bert.config
        cfg.architectures = ["BertModel"]
        cfg.save_pretrained(model_dir)
        save_file(to_store_dtype(model.state_for_file(), store_dtype), str(model_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        (model_dir / "1_Pooling").mkdir()
        (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(ST_POOLING_CONFIG, indent=2) + "\n")
        (model_dir / "modules.json").write_text(json.dumps(ST_MODULES, indent=2) + "\n")
        return

    if case.get("shards"):
        # Deterministic split: embeddings + layer 0 | everything else.
        model.config.save_pretrained(model_dir)
        sd = to_store_dtype(model.state_dict(), store_dtype)
        names = sorted(sd)
        first = [n for n in names if ".embeddings." in n or ".encoder.layer.0." in n]
        parts = [first, [n for n in names if n not in first]]
        total = len(parts)
        weight_map = {}
        for i, part in enumerate(parts, 1):
            fname = f"model-{i:05d}-of-{total:05d}.safetensors"
            save_file({n: sd[n] for n in part}, str(model_dir / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return

    stored = model.to(store_dtype)
    stored.save_pretrained(model_dir, safe_serialization=True)
    model.double()


def check_saved_file(model, model_dir: Path, store_dtype: torch.dtype):
    """Every parameter is on disk, in the right dtype, with the exact values used."""
    files = sorted(model_dir.glob("*.safetensors"))
    on_disk = {}
    for f in files:
        on_disk.update(load_file(str(f)))
    expected_sd = model.state_for_file() if isinstance(model, MeanPoolClassifier) else model.state_dict()
    missing = set(expected_sd) - set(on_disk)
    extra = set(on_disk) - set(expected_sd)
    assert not missing and not extra, (missing, extra)
    for k, v in on_disk.items():
        assert v.dtype == store_dtype, (k, v.dtype)
        assert torch.equal(v.double(), expected_sd[k].detach().double()), k
    return sorted(on_disk)


def reload(case: dict, model_dir: Path):
    if case["arch"] == "bert_st":
        bert = BertModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=True)
        m = MeanPoolClassifier(bert, case["num_labels"])
        sd = load_file(str(model_dir / "model.safetensors"))
        with torch.no_grad():
            m.classifier.weight.copy_(sd["classifier.weight"].float())
            m.classifier.bias.copy_(sd["classifier.bias"].float())
            # from_pretrained ignores unexpected keys; make sure BertModel really got the file's values.
            for n, p in bert.state_dict().items():
                assert torch.equal(p.float(), sd[n].float()), n
        model = m
    else:
        cls = RobertaForSequenceClassification if case["arch"] == "roberta" else BertForSequenceClassification
        model = cls.from_pretrained(model_dir, attn_implementation="eager")
    return model.eval()


def self_check(case: dict, model_dir: Path, exp: dict[str, torch.Tensor], names: list[str]) -> float:
    """Reload from disk, recompute in float64 and compare with the stored expectations.
    Returns the max |logit| error of a float32 forward (for information)."""
    model = reload(case, model_dir).double()
    params = dict(file_named_parameters(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    inputs = {k: exp[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    logits, loss, _, _ = run_model(case, model, inputs)
    loss.backward()
    assert torch.allclose(logits.float(), exp["logits"], rtol=0, atol=1e-6), (logits, exp["logits"])
    assert torch.allclose(loss.float().reshape(1), exp["loss"], rtol=1e-6, atol=1e-6)
    for n in names:
        assert torch.allclose(params[n].grad.float(), exp[f"grad.{n}"], rtol=1e-6, atol=1e-7), n

    # float32 forward, to document the precision gap an f32 engine should expect.
    with torch.no_grad():
        m32 = model.float()
        logits32, _, _, _ = run_model(case, m32, inputs, dtype=torch.float32)
    return float((logits32 - exp["logits"]).abs().max())


# --------------------------------------------------------------------------- main


def save_deterministic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    """save_file, then rewrite the JSON header with the metadata keys sorted.

    safetensors keeps __metadata__ in a hash map, so its key order (and thus the
    file's bytes) would otherwise change from run to run. Reordering keeps the
    header length, so the data section is untouched.
    """
    save_file(tensors, str(path), metadata=metadata)
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=dict)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":")).encode("utf-8")
    assert len(new) <= n, (len(new), n)
    raw[8:8 + n] = new + b" " * (n - len(new))
    path.write_bytes(bytes(raw))


def versions() -> dict[str, str]:
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }


def make_case(name: str, case: dict):
    torch.manual_seed(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    store_dtype = getattr(torch, case.get("store_dtype", "float32"))

    config = make_config(case)
    model = build_model(case, config).float()
    randomize_(model, gen)
    inputs = make_inputs(case, config, gen)
    round_weights_(model, store_dtype)
    names = trainable_names(case, model)

    exp = compute_expected(case, model, inputs, names)

    case_dir = OUT_DIR / name
    case_dir.mkdir(parents=True, exist_ok=True)
    model_dir = case_dir / "model"
    write_model(case, model, model_dir, store_dtype)
    keys = check_saved_file(model, model_dir, store_dtype)

    meta = {
        "case": name,
        "arch": {"bert": "bert", "bert_st": "bert", "roberta": "roberta"}[case["arch"]],
        "pooling": case["pooling"],
        "loss": case["loss"],
        "num_labels": str(case["num_labels"]),
        "weights_dtype": case.get("store_dtype", "float32"),
        "compute_dtype": "float64",
        "seed": str(case["seed"]),
        **versions(),
    }
    save_deterministic(exp, case_dir / "expected.safetensors", meta)

    # Round-trip expected.safetensors and self-check against the model on disk.
    exp_disk = load_file(str(case_dir / "expected.safetensors"))
    assert set(exp_disk) == set(exp)
    f32_err = self_check(case, model_dir, exp_disk, names)
    return dict(case_dir=case_dir, model_keys=keys, exp_keys=list(exp), loss=float(exp["loss"]),
                f32_err=f32_err, n_grads=len(names))


def write_readme(results: dict, dec_results: dict):
    v = versions()
    lines = [
        "# Hugging Face parity fixtures",
        "",
        "<!-- Generated by scripts/make_fixtures.py; edit the script, not this file. -->",
        "",
        "Tiny random BERT / RoBERTa models together with the logits, loss and gradients that",
        "Hugging Face `transformers` computes for them. beft's tests load each `model/`",
        "directory with the engine, run forward + the bias-only backward on the stored batch",
        "and compare with `expected.safetensors`.",
        "",
        "## Regenerate",
        "",
        "```sh",
        "pip install -r scripts/requirements-fixtures.txt && python scripts/make_fixtures.py",
        "```",
        "",
        "CPU only, a few seconds, deterministic (fixed seeds). The script reloads every saved",
        "model from disk and re-checks logits, loss and gradients before it finishes.",
        "",
        f"Generated with transformers {v['transformers_version']}, torch {v['torch_version']},",
        f"safetensors {v['safetensors_version']}, Python {v['python_version']}.",
        "",
        "## Model",
        "",
        "vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,",
        "intermediate_size=48, max_position_embeddings=40 (RoBERTa: 42), hidden_act=\"gelu\" (erf),",
        "layer_norm_eps=1e-12, type_vocab_size=2 (RoBERTa: 1), eager attention.",
        "Weights are loud on purpose: Linear/Embedding weights ~ N(0, 0.2²), every bias ~ N(0, 0.1²)",
        "(none is zero), LayerNorm weight = 1 + N(0, 0.1²), LayerNorm bias ~ N(0, 0.1²).",
        "",
        "Expected values are computed in **float64** (eval mode, no dropout) from exactly the",
        "weights on disk (rounded to the stored dtype first), then stored as float32.",
        "",
        "## Cases",
        "",
        "| case | model | pooling | loss | notes |",
        "|---|---|---|---|---|",
        "| `bert_cls` | BertForSequenceClassification, 3 labels | CLS → pooler (dense+tanh) | cross-entropy (mean) | |",
        "| `bert_pair_regression` | BertForSequenceClassification, 1 label | CLS → pooler | MSE (mean) | token_type_ids 0…0 1…1 (sentence pair), problem_type \"regression\" |",
        "| `roberta_cls` | RobertaForSequenceClassification, 2 labels | `<s>` → classifier.dense+tanh → classifier.out_proj | cross-entropy | pad_token_id=1, positions = pad+1+i for real tokens, pad_token_id on padding |",
        "| `bert_mean` | sentence-transformers layout: BertModel (no `bert.` prefix) + `classifier.*` in the same file, 2 labels | masked mean over tokens | cross-entropy | `pooler.*` present in the file but unused; `1_Pooling/config.json`, `modules.json` |",
        "| `bert_cls_bf16` | as `bert_cls` (same seed), weights stored as bfloat16 | CLS → pooler | cross-entropy | expected values computed from the bf16-rounded weights |",
        "| `bert_cls_sharded` | as `bert_cls`, weights in `model-0000{1,2}-of-00002.safetensors` + `model.safetensors.index.json` | CLS → pooler | cross-entropy | expected.safetensors identical to `bert_cls` |",
        "",
        "## Batch",
        "",
        "B=3, T=7, right padding, attention_mask row lengths 7, 5, 3. First token id 2, other real",
        "tokens uniform in [3, 50); padding positions hold pad_token_id (BERT 0, RoBERTa 1) and",
        "token_type_id 0. Labels: int32 class ids, or float32 targets for regression.",
        "",
        "## expected.safetensors",
        "",
        "| tensor | dtype | shape | meaning |",
        "|---|---|---|---|",
        "| `input_ids`, `token_type_ids`, `attention_mask` | I32 | [B, T] | the batch |",
        "| `labels` | I32 (F32 for regression) | [B] | targets |",
        "| `logits` | F32 | [B, num_labels] | model output |",
        "| `loss` | F32 | [1] | mean loss over the batch |",
        "| `pooled` | F32 | [B, H] | input of the final Linear layer (BERT: pooler output; RoBERTa: tanh(classifier.dense(h[:,0])); mean: masked mean) |",
        "| `hidden_states.{0..L}` | F32 | [B, T, H] | embedding output (0) and each layer's output; padding positions are HF's values and should be ignored |",
        "| `grad.<name>` | F32 | shape of the parameter | d loss / d parameter |",
        "",
        "Gradients are named `grad.` + the parameter name exactly as it appears in",
        "`model/model.safetensors` (e.g. `grad.bert.encoder.layer.0.attention.self.query.bias`,",
        "`grad.classifier.weight`; in `bert_mean` without prefix:",
        "`grad.encoder.layer.0.attention.self.query.bias`). The trainable set is every",
        "parameter whose name ends in `.bias` (embeddings LayerNorm, Q/K/V/attention output,",
        "attention LayerNorm, intermediate, output, output LayerNorm, pooler / RoBERTa",
        "`classifier.dense`, classifier) plus the head's output weight (`classifier.weight`, or",
        "`classifier.out_proj.weight` for RoBERTa). LayerNorm weights, `classifier.dense.weight`",
        "and `pooler.dense.weight` are frozen. In `bert_mean` the unused `pooler.dense.bias` has",
        "no gradient entry.",
        "",
        "`grad.*.attention.self.key.bias` is zero in exact arithmetic (the key bias shifts all",
        "scores of a query row by the same amount, which softmax ignores); the stored values are",
        "float64 rounding noise (~1e-17). Compare gradients with an absolute tolerance.",
        "Padding positions get exactly zero gradient (masked keys, pooling ignores them).",
        "",
        "Metadata (`__metadata__`): case, arch, pooling (`cls`|`mean`), loss (`ce`|`mse`),",
        "num_labels, weights_dtype, compute_dtype, seed, transformers/torch/safetensors/python versions.",
        "",
        "## Hugging Face naming notes (transformers 5)",
        "",
        "- LayerNorm parameters are saved as `*.LayerNorm.weight` / `*.LayerNorm.bias`. transformers",
        "  5 still renames legacy `LayerNorm.gamma` / `LayerNorm.beta` on load (old Hub checkpoints",
        "  use them), but never writes them.",
        "- No `position_embedding_type` in config.json: transformers 5's BERT/RoBERTa have only",
        "  absolute position embeddings (relative_key variants were removed).",
        "- `config.json` has `dtype` (not `torch_dtype`); BERT configs carry `tie_word_embeddings: true`",
        "  although sequence-classification models tie nothing. `problem_type` is set explicitly.",
        "- The non-persistent buffers `embeddings.position_ids` / `embeddings.token_type_ids` are",
        "  not in the files.",
        "- RoBERTa's head is `classifier.dense` (+tanh) → `classifier.out_proj`; it has no",
        "  `roberta.pooler.*`.",
        "- `bert_mean/model/config.json` has `architectures: [\"BertModel\"]`, no `dtype`, and no",
        "  label count: take num_labels from `classifier.weight`'s shape.",
        "",
        "## Summary of the last generation",
        "",
        "| case | files | loss | f32 forward max logit error |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        size = sum(p.stat().st_size for p in r["case_dir"].rglob("*") if p.is_file())
        lines.append(f"| `{name}` | {size / 1024:.1f} KiB | {r['loss']:.6f} | {r['f32_err']:.1e} |")
    lines += [
        "",
        "## Decoder cases",
        "",
        "Tiny random causal LMs (vocab 64, hidden 32, 2 layers, 4 heads, MLP 48, 40 positions),",
        "batch of 3 rows of 7, 5 and 3 real tokens (left or right padding), position_ids =",
        "number of real tokens before each token. Loss: mean next-token cross-entropy over every",
        "position whose next token is real (`rows` = b·T + t, `targets` = the next token).",
        "`logits` holds the logits at those rows only ([R, vocab]). Every bias has a gradient",
        "`grad.<name>`; GPT-2's fused `c_attn.bias` is one [3·hidden] tensor (q, k, v slices).",
        "LLaMA / Qwen2 get zero biases on their bias-free projections before the gradient is",
        "taken (metadata `added_biases`); `model/` does not contain them.",
        "",
        "| case | model | padding | notes |",
        "|---|---|---|---|",
        "| `gpt2_lm` | GPT2LMHeadModel, gelu_new, tied head | right | Conv1D weights, fused c_attn |",
        "| `opt_lm` | OPTForCausalLM, pre-LN, ReLU, tied head | left | learned positions offset 2 |",
        "| `opt_postln_lm` | OPTForCausalLM, do_layer_norm_before=false, word_embed_proj_dim=24 | right | project_in/out, no final LayerNorm |",
        "| `llama_lm` | LlamaForCausalLM, 2 KV heads (GQA), rope_theta 500, untied head | left | zero biases added on q,k,v,o,gate,up,down |",
        "| `qwen2_lm` | Qwen2ForCausalLM, 2 KV heads, rope_theta 1000, tied head | right | q,k,v biases; zero biases added on o,gate,up,down |",
        "",
        "| case | files | loss | #grads |",
        "|---|---|---|---|",
    ]
    for name, r in dec_results.items():
        size = sum(p.stat().st_size for p in r["case_dir"].rglob("*") if p.is_file())
        lines.append(f"| `{name}` | {size / 1024:.1f} KiB | {r['loss']:.6f} | {r['n_grads']} |")
    lines.append("")
    (OUT_DIR / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- decoders
#
# Tiny random causal LMs (GPT-2, OPT pre-LN, OPT post-LN with project_in/out,
# LLaMA with grouped-query attention, Qwen2). The loss is the mean next-token
# cross-entropy over every position whose next token is real (teacher
# forcing); the trainable set is every bias, plus, for the bias-free
# projections of LLaMA / Qwen2, a zero bias attached as an nn.Parameter (the
# base model written to disk does not contain it).

DEC_TINY = dict(vocab_size=64, hidden=32, layers=2, heads=4, ff=48, max_pos=40)
DEC_LENGTHS = [7, 5, 3]

DECODER_CASES = {
    "gpt2_lm": dict(arch="gpt2", padding="right", seed=2001),
    "opt_lm": dict(arch="opt", padding="left", seed=2002),
    "opt_postln_lm": dict(arch="opt_post", padding="right", seed=2003),
    "llama_lm": dict(arch="llama", padding="left", seed=2004),
    "qwen2_lm": dict(arch="qwen2", padding="right", seed=2005),
}


def make_decoder_model(case: dict):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    t = DEC_TINY
    a = case["arch"]
    if a == "gpt2":
        cfg = GPT2Config(vocab_size=t["vocab_size"], n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
                         n_inner=t["ff"], n_positions=t["max_pos"], activation_function="gelu_new",
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    if a in ("opt", "opt_post"):
        post = a == "opt_post"
        cfg = OPTConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                        num_attention_heads=t["heads"], ffn_dim=t["ff"], max_position_embeddings=t["max_pos"],
                        do_layer_norm_before=not post, word_embed_proj_dim=24 if post else t["hidden"],
                        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
        return OPTForCausalLM._from_config(cfg, attn_implementation="eager")
    if a == "llama":
        cfg = LlamaConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                          num_attention_heads=t["heads"], num_key_value_heads=2, intermediate_size=t["ff"],
                          max_position_embeddings=t["max_pos"], rope_theta=500.0, tie_word_embeddings=False,
                          rms_norm_eps=1e-6)
        return LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    cfg = Qwen2Config(vocab_size=t["vocab_size"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                      num_attention_heads=t["heads"], num_key_value_heads=2, intermediate_size=t["ff"],
                      max_position_embeddings=t["max_pos"], rope_theta=1000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, use_sliding_window=False)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager")


ADDED_BIAS_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_decoder_(model, gen: torch.Generator):
    """randomize_ for decoders: also GPT-2's Conv1D and the RMSNorms."""
    with torch.no_grad():
        for _, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, nn.Parameter):
                continue
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=gen) * WEIGHT_STD)
            else:
                w.add_(torch.randn(w.shape, generator=gen) * PERTURB_STD)
            b = getattr(mod, "bias", None)
            if isinstance(b, nn.Parameter):
                b.add_(torch.randn(b.shape, generator=gen) * PERTURB_STD)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert bool((p != 0).all()), f"{name} has an exact zero"


def attach_zero_biases(model) -> list[str]:
    """Give every bias-free projection of a LLaMA-family layer a zero bias
    (what beft's --bias adds); returns the new parameters' names."""
    added = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in ADDED_BIAS_MODULES and mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype))
            added.append(name + ".bias")
    return added


def detach_added_biases(model, added: list[str]):
    for n in added:
        mod = model.get_submodule(n[: -len(".bias")])
        mod.bias = None


def make_decoder_inputs(case: dict, gen: torch.Generator):
    V = DEC_TINY["vocab_size"]
    T = max(DEC_LENGTHS)
    pad = 1 if case["arch"].startswith("opt") else 0
    ids = torch.full((BATCH, T), pad, dtype=torch.int32)
    mask = torch.zeros((BATCH, T), dtype=torch.int32)
    for b, n in enumerate(DEC_LENGTHS):
        toks = torch.randint(3, V, (n,), generator=gen, dtype=torch.int32)
        s = T - n if case["padding"] == "left" else 0
        ids[b, s:s + n] = toks
        mask[b, s:s + n] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0).to(torch.int32)
    rows, targets = [], []
    for b in range(BATCH):
        for t in range(T - 1):
            if mask[b, t] == 1 and mask[b, t + 1] == 1:
                rows.append(b * T + t)
                targets.append(int(ids[b, t + 1]))
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos,
                rows=torch.tensor(rows, dtype=torch.int32), targets=torch.tensor(targets, dtype=torch.int32))


def decoder_layers(model):
    if hasattr(model, "transformer"):
        return model.transformer.h
    if hasattr(model.model, "decoder"):
        return model.model.decoder.layers
    return model.model.layers


def run_decoder(model, inputs: dict):
    # With left padding, a padding query sees no key at all; transformers' eager
    # attention then gives it NaN, which later layers would spread through
    # 0·NaN. Padding rows are masked out as keys, so any finite value is right:
    # zero them after every layer (beft's attention outputs zero there).
    keep = inputs["attention_mask"].to(torch.float64).unsqueeze(-1) > 0

    def hook(_m, _args, out):
        if isinstance(out, tuple):
            return (torch.where(keep, out[0], torch.zeros_like(out[0])),) + tuple(out[1:])
        return torch.where(keep, out, torch.zeros_like(out))

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        return _run_decoder(model, inputs)
    finally:
        for h in handles:
            h.remove()


def _run_decoder(model, inputs: dict):
    # A 4-D additive mask: causal + key padding, and a padding query sees
    # itself (so that no softmax row is empty and nothing is NaN).
    m = inputs["attention_mask"].bool()
    T = m.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    vis = causal.unsqueeze(0) & m.unsqueeze(1)
    vis = vis | (torch.eye(T, dtype=torch.bool).unsqueeze(0) & ~m.unsqueeze(2))
    dtype = next(model.parameters()).dtype
    mask4 = torch.zeros(vis.shape, dtype=dtype).masked_fill(~vis, torch.finfo(dtype).min).unsqueeze(1)
    out = model(input_ids=inputs["input_ids"].long(), attention_mask=mask4,
                position_ids=inputs["position_ids"].long(), use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])[inputs["rows"].long()]
    loss = F.cross_entropy(logits, inputs["targets"].long())
    return logits, loss


def decoder_grads(model, inputs: dict):
    model.eval()
    params = dict(model.named_parameters())
    names = [n for n in params if n.endswith(".bias")]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for n in names:
        params[n].requires_grad_(True)
    logits, loss = run_decoder(model, inputs)
    loss.backward()
    grads = {}
    for n in names:
        g = params[n].grad
        assert g is not None, f"no gradient reached {n}"
        grads[n] = g.detach().float().contiguous()
    return logits, loss, grads


def make_decoder_case(name: str, case: dict):
    torch.manual_seed(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    model = make_decoder_model(case).float()
    randomize_decoder_(model, gen)
    round_weights_(model, torch.float32)
    added = attach_zero_biases(model) if case["arch"] in ("llama", "qwen2") else []
    inputs = make_decoder_inputs(case, gen)
    logits, loss, grads = decoder_grads(model, inputs)

    case_dir = OUT_DIR / name
    model_dir = case_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    detach_added_biases(model, added)
    model.float().save_pretrained(model_dir, safe_serialization=True)
    model.double()

    exp = {k: v.contiguous() for k, v in inputs.items()}
    exp["logits"] = logits.detach().float()
    exp["loss"] = loss.detach().float().reshape(1)
    for n, g in grads.items():
        exp[f"grad.{n}"] = g
    meta = {"case": name, "arch": case["arch"], "padding": case["padding"], "added_biases": ",".join(added),
            "compute_dtype": "float64", "seed": str(case["seed"]), **versions()}
    save_deterministic(exp, case_dir / "expected.safetensors", meta)

    # Self-check: reload from disk, re-attach the zero biases, recompute.
    cls = type(model)
    m2 = cls.from_pretrained(model_dir, attn_implementation="eager").double()
    if added:
        assert sorted(attach_zero_biases(m2)) == sorted(added)
    m2.double()
    lg2, loss2, g2 = decoder_grads(m2, inputs)
    assert torch.allclose(lg2.float(), exp["logits"], rtol=0, atol=1e-6)
    assert abs(float(loss2.detach()) - float(loss.detach())) < 1e-6
    for n, g in grads.items():
        assert torch.allclose(g2[n], g, rtol=1e-6, atol=1e-7), n
    return dict(case_dir=case_dir, loss=float(loss), n_grads=len(grads))


def main():
    torch.set_num_threads(1)  # reproducible reductions
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    results = {}
    for name, case in CASES.items():
        results[name] = make_case(name, case)

    # The sharded case must match bert_cls bit for bit.
    a = load_file(str(OUT_DIR / "bert_cls" / "expected.safetensors"))
    b = load_file(str(OUT_DIR / "bert_cls_sharded" / "expected.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    dec_results = {}
    for name, case in DECODER_CASES.items():
        dec_results[name] = make_decoder_case(name, case)

    write_readme(results, dec_results)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}\n")
    print("model.safetensors keys (bert_cls):")
    for k in results["bert_cls"]["model_keys"]:
        print("   ", k)
    print("\nexpected.safetensors tensors (bert_cls):")
    for k in results["bert_cls"]["exp_keys"]:
        print("   ", k)
    print()
    header = f"{'case':<22} {'model':>10} {'expected':>10} {'total':>10} {'#grads':>7} {'loss':>12} {'f32 err':>9}"
    print(header)
    print("-" * len(header))
    grand = 0
    for name, r in results.items():
        d = r["case_dir"]
        model_sz = sum(p.stat().st_size for p in (d / "model").rglob("*") if p.is_file())
        exp_sz = (d / "expected.safetensors").stat().st_size
        grand += model_sz + exp_sz
        print(f"{name:<22} {model_sz:>10,} {exp_sz:>10,} {model_sz + exp_sz:>10,} {r['n_grads']:>7} "
              f"{r['loss']:>12.6f} {r['f32_err']:>9.1e}")
    print(f"{'all':<22} {'':>10} {'':>10} {grand:>10,} bytes")
    print("\nself-check passed: every model reloaded from disk reproduces logits, loss and gradients.")


if __name__ == "__main__":
    main()
