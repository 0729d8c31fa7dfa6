//! Adapters both ways between beft's `biases.safetensors` and the Hugging
//! Face world:
//!
//! - **PEFT** (`--format peft`): a directory that `peft.PeftModel.from_pretrained`
//!   loads as a BEFT adapter (`peft_type: "BEFT"`, PEFT ≥ 0.21). PEFT's BEFT
//!   layer adds a trainable vector `beft_bias` (`[1, out]`, zero-initialised)
//!   to the output of an `nn.Linear`, so a trained Linear bias is stored as
//!   the *change* `b_ft − b_0` under
//!   `base_model.model.<module>.beft_bias`. Everything that is not a Linear
//!   bias — LayerNorm biases, the classification head — goes through
//!   `modules_to_save` as whole modules (`base_model.model.<module>.<param>`).
//! - **merged** (`--format merged`): a full safetensors model with the trained
//!   biases folded in, loadable by `transformers` directly. Refused for biases
//!   that were added to bias-free projections (the base model has no slot).
//!
//! Mean pooling (sentence-transformers) has no `*ForSequenceClassification`
//! class in `transformers`: its adapter targets the bare encoder
//! (`task_type: FEATURE_EXTRACTION`) and the head is written beside it as
//! `head.safetensors` (`classifier.weight`, `classifier.bias`, applied to the
//! mask-weighted mean of the last hidden states).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::backend::cpu::CpuBackend;
use crate::backend::PoolKind;
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelDir};
use crate::model::{BiasTerm, Encoder, EncoderOptions, SlotKind};
use crate::train::parse_pooling;
use crate::weights::{write_safetensors, WeightStore};

/// Output format of `beft export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Peft,
    Merged,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "peft" => Ok(ExportFormat::Peft),
            "merged" => Ok(ExportFormat::Merged),
            other => Err(Error::msg(format!(
                "--format: unknown format '{other}' (peft or merged)"
            ))),
        }
    }
}

/// A trained biases file opened against its base model.
struct Trained {
    md: ModelDir,
    enc: Encoder<CpuBackend<f32>>,
    /// Trained values in slab layout.
    values: Vec<f64>,
    pooling: PoolKind,
    meta: BTreeMap<String, String>,
}

fn open_trained(model: &Path, biases: &Path) -> Result<Trained> {
    let store = WeightStore::open_file(biases)?;
    let meta = store.metadata().clone();
    let md = ModelDir::open(model)?;
    md.check_biases_base(biases, &store)?;
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            Error::file(
                biases,
                format!("metadata lacks '{k}': not a beft biases file"),
            )
        })
    };
    let terms = BiasTerm::parse_set(&get("bias_terms")?)?;
    let pooling = parse_pooling(&get("pooling")?)?;
    let num_labels: usize = get("num_labels")?
        .parse()
        .map_err(|_| Error::file(biases, "bad num_labels in metadata"))?;
    let be = CpuBackend::<f32>::new();
    let enc = Encoder::load(
        &be,
        &md,
        EncoderOptions {
            pooling,
            num_labels,
            terms,
            seed: 0,
        },
    )?;
    let mut values = enc.init.clone();
    enc.layout.read_values(&store, biases, &mut values)?;
    Ok(Trained {
        md,
        enc,
        values,
        pooling,
        meta,
    })
}

/// The module path of a checkpoint tensor in the `transformers` class the
/// adapter targets (`BertForSequenceClassification` etc. for CLS pooling,
/// the bare encoder for mean pooling).
fn class_path(t: &Trained, checkpoint_name: &str) -> String {
    let head = checkpoint_name.starts_with("classifier.");
    let base = checkpoint_name
        .strip_prefix(t.enc.prefix.as_str())
        .unwrap_or(checkpoint_name);
    if head {
        return checkpoint_name.to_string();
    }
    match t.pooling {
        PoolKind::Cls => {
            let p = match t.md.config.arch {
                Arch::Roberta => "roberta.",
                _ => "bert.",
            };
            format!("{p}{base}")
        }
        PoolKind::Mean => base.to_string(),
    }
}

fn module_of(param: &str) -> &str {
    param.rsplit_once('.').map(|(m, _)| m).unwrap_or(param)
}

/// `beft export`: write `biases` (trained on `model`) as a PEFT adapter or a
/// merged model into `out` (created; must not exist or be empty).
pub fn export(model: &Path, biases: &Path, format: ExportFormat, out: &Path) -> Result<PathBuf> {
    let t = open_trained(model, biases)?;
    if let Some(added) = t.meta.get("added_biases").filter(|s| !s.is_empty()) {
        if format == ExportFormat::Merged {
            return Err(Error::file(
                biases,
                format!("holds biases added to bias-free projections ({added}); the base model has no slot for them, so they cannot be merged — export with --format peft"),
            ));
        }
    }
    if out.exists()
        && fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::file(out, "exists and is not empty"));
    }
    // Assemble in a staging directory; rename into place when complete.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        out.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let res = match format {
        ExportFormat::Peft => write_peft(&t, &staging),
        ExportFormat::Merged => write_merged(&t, &staging),
    };
    if let Err(e) = res {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    if out.exists() {
        fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
    Ok(out.to_path_buf())
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|x| *x as f32).collect()
}

fn write_peft(t: &Trained, dir: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    let mut to_save: Vec<String> = Vec::new();
    let mut head: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let roberta_head = t.md.config.arch == Arch::Roberta && t.pooling == PoolKind::Cls;
    for slot in &t.enc.layout.slots {
        let trained = &t.values[slot.offset..slot.offset + slot.len()];
        let base = &t.enc.init[slot.offset..slot.offset + slot.len()];
        let in_head = matches!(slot.kind, SlotKind::HeadWeight | SlotKind::HeadBias)
            || (roberta_head && slot.kind == SlotKind::PoolerBias);
        if in_head {
            if t.pooling == PoolKind::Mean {
                head.push((slot.name.clone(), slot.shape.clone(), f32s(trained)));
            } else if !to_save.contains(&"classifier".to_string()) {
                to_save.push("classifier".into());
            }
            continue;
        }
        let module = class_path(t, module_of(&slot.name));
        match slot.kind {
            SlotKind::Bias(BiasTerm::Ln1 | BiasTerm::Ln2 | BiasTerm::EmbLn) => {
                // A LayerNorm is not an nn.Linear: save the whole module.
                let w =
                    t.md.weights
                        .get(&format!("{}.weight", module_of(&slot.name)))?
                        .to_f32_vec();
                tensors.push((
                    format!("base_model.model.{module}.weight"),
                    slot.shape.clone(),
                    w,
                ));
                tensors.push((
                    format!("base_model.model.{module}.bias"),
                    slot.shape.clone(),
                    f32s(trained),
                ));
                to_save.push(module);
            }
            _ => {
                let delta: Vec<f32> = trained
                    .iter()
                    .zip(base)
                    .map(|(a, b)| (a - b) as f32)
                    .collect();
                tensors.push((
                    format!("base_model.model.{module}.beft_bias"),
                    vec![1, slot.len()],
                    delta,
                ));
                targets.push(module);
            }
        }
    }
    if to_save.iter().any(|m| m == "classifier") {
        // The whole classification module as trained (frozen parts included).
        let mut names: Vec<&str> =
            t.md.weights
                .names()
                .into_iter()
                .filter(|n| n.starts_with("classifier."))
                .collect();
        for slot in &t.enc.layout.slots {
            if slot.name.starts_with("classifier.") && !names.contains(&slot.name.as_str()) {
                names.push(&slot.name);
            }
        }
        for name in names {
            let vals = match t.enc.layout.slots.iter().find(|s| s.name == name) {
                Some(s) => (
                    s.shape.clone(),
                    f32s(&t.values[s.offset..s.offset + s.len()]),
                ),
                None => {
                    let tv = t.md.weights.get(name)?;
                    (tv.shape.clone(), tv.to_f32_vec())
                }
            };
            tensors.push((format!("base_model.model.{name}"), vals.0, vals.1));
        }
    }
    let task_type = if t.pooling == PoolKind::Cls {
        "SEQ_CLS"
    } else {
        "FEATURE_EXTRACTION"
    };
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, &meta)?;
    let cfg = json!({
        "peft_type": "BEFT",
        "task_type": task_type,
        "target_modules": targets,
        "modules_to_save": if to_save.is_empty() { serde_json::Value::Null } else { json!(to_save) },
        "init_weights": true,
        "inference_mode": true,
        "base_model_name_or_path": t.md.name,
        "revision": null,
        "auto_mapping": null,
        "beft": {
            "bias_terms": t.meta.get("bias_terms"),
            "pooling": t.meta.get("pooling"),
            "num_labels": t.meta.get("num_labels"),
            "base_model_fingerprint": t.meta.get("base_model_fingerprint"),
            "task": t.meta.get("task"),
        },
    });
    write_text(
        &dir.join("adapter_config.json"),
        &serde_json::to_string_pretty(&cfg).unwrap_or_default(),
    )?;
    if !head.is_empty() {
        write_safetensors(&dir.join("head.safetensors"), &head, &BTreeMap::new())?;
    }
    Ok(())
}

fn write_text(path: &Path, s: &str) -> Result<()> {
    fs::write(path, format!("{s}\n")).map_err(|e| Error::io(path, e))
}

fn write_merged(t: &Trained, dir: &Path) -> Result<()> {
    let trained: BTreeMap<&str, &[f64]> = t
        .enc
        .layout
        .slots
        .iter()
        .map(|s| (s.name.as_str(), &t.values[s.offset..s.offset + s.len()]))
        .collect();
    let mut tensors = Vec::new();
    let rename = |name: &str| -> String {
        if name.starts_with("classifier.") {
            name.to_string()
        } else {
            class_path(t, name)
        }
    };
    for name in t.md.weights.names() {
        let tv = t.md.weights.get(name)?;
        let vals = match trained.get(name) {
            Some(v) => f32s(v),
            None => tv.to_f32_vec(),
        };
        tensors.push((rename(name), tv.shape.clone(), vals));
    }
    for slot in &t.enc.layout.slots {
        if t.md.weights.try_get(&slot.name).is_none() {
            tensors.push((
                rename(&slot.name),
                slot.shape.clone(),
                f32s(trained[slot.name.as_str()]),
            ));
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("model.safetensors"), &tensors, &meta)?;
    let cfg_path = t.md.dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?)
            .map_err(|e| Error::file(&cfg_path, e))?;
    let n: usize = t
        .meta
        .get("num_labels")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    cfg["num_labels"] = json!(n);
    cfg["id2label"] = json!((0..n)
        .map(|i| (i.to_string(), format!("LABEL_{i}")))
        .collect::<BTreeMap<_, _>>());
    cfg["label2id"] = json!((0..n)
        .map(|i| (format!("LABEL_{i}"), i))
        .collect::<BTreeMap<_, _>>());
    if n == 1 {
        cfg["problem_type"] = json!("regression");
    }
    if t.pooling == PoolKind::Cls {
        let class = match t.md.config.arch {
            Arch::Roberta => "RobertaForSequenceClassification",
            _ => "BertForSequenceClassification",
        };
        cfg["architectures"] = json!([class]);
    }
    write_text(
        &dir.join("config.json"),
        &serde_json::to_string_pretty(&cfg).unwrap_or_default(),
    )?;
    for extra in [
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = t.md.dir.join(extra);
        if src.is_file() {
            fs::copy(&src, dir.join(extra)).map_err(|e| Error::io(&src, e))?;
        }
    }
    if t.pooling == PoolKind::Mean {
        let pool = t.md.dir.join("1_Pooling/config.json");
        if pool.is_file() {
            fs::create_dir_all(dir.join("1_Pooling")).map_err(|e| Error::io(dir, e))?;
            fs::copy(&pool, dir.join("1_Pooling/config.json")).map_err(|e| Error::io(&pool, e))?;
        }
    }
    Ok(())
}

/// `beft import-peft`: read a PEFT BEFT adapter directory (as written by
/// `beft export --format peft`, or trained in PyTorch with PEFT's
/// `BeftConfig`) back into a beft biases file for `model`.
pub fn import_peft(adapter: &Path, model: &Path, out: &Path) -> Result<PathBuf> {
    let cfg_path = adapter.join("adapter_config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?)
            .map_err(|e| Error::file(&cfg_path, e))?;
    if cfg.get("peft_type").and_then(|v| v.as_str()) != Some("BEFT") {
        return Err(Error::file(
            &cfg_path,
            format!(
                "peft_type is {}, not \"BEFT\"",
                cfg.get("peft_type").unwrap_or(&serde_json::Value::Null)
            ),
        ));
    }
    let store = WeightStore::open_file(&adapter.join("adapter_model.safetensors"))?;
    let md = ModelDir::open(model)?;
    let b = cfg.get("beft");
    let pooling = match b.and_then(|b| b["pooling"].as_str()) {
        Some(p) => parse_pooling(p)?,
        None => {
            if cfg["task_type"] == "FEATURE_EXTRACTION" {
                PoolKind::Mean
            } else {
                PoolKind::Cls
            }
        }
    };
    // Which terms: from beft's own record, else every Linear target and
    // LayerNorm module present.
    let terms = match b.and_then(|b| b["bias_terms"].as_str()) {
        Some(s) => BiasTerm::parse_set(s)?,
        None => infer_terms(&store),
    };
    let num_labels: usize = match b
        .and_then(|b| b["num_labels"].as_str())
        .and_then(|s| s.parse().ok())
    {
        Some(n) => n,
        None => store
            .names()
            .iter()
            .find(|n| n.ends_with("classifier.weight") || n.ends_with("classifier.out_proj.weight"))
            .and_then(|n| store.get(n).ok())
            .map(|t| t.shape[0])
            .ok_or_else(|| {
                Error::file(
                    &cfg_path,
                    "cannot tell the number of labels (no classifier in the adapter)",
                )
            })?,
    };
    let be = CpuBackend::<f32>::new();
    let enc = Encoder::load(
        &be,
        &md,
        EncoderOptions {
            pooling,
            num_labels,
            terms: terms.clone(),
            seed: 0,
        },
    )?;
    let head_file = adapter.join("head.safetensors");
    let head_store = if head_file.is_file() {
        Some(WeightStore::open_file(&head_file)?)
    } else {
        None
    };
    let t = Trained {
        md,
        enc,
        values: Vec::new(),
        pooling,
        meta: BTreeMap::new(),
    };
    let mut values = t.enc.init.clone();
    for slot in &t.enc.layout.slots {
        let module = class_path(&t, module_of(&slot.name));
        let in_head = slot.name.starts_with("classifier.");
        let got: Vec<f64> = if in_head {
            match &head_store {
                Some(h) if t.pooling == PoolKind::Mean => {
                    h.get_shaped(&slot.name, &slot.shape)?.to_f64_vec()
                }
                _ => store
                    .get_shaped(&format!("base_model.model.{}", slot.name), &slot.shape)?
                    .to_f64_vec(),
            }
        } else if let Some(delta) = store.try_get(&format!("base_model.model.{module}.beft_bias")) {
            if delta.numel() != slot.len() {
                return Err(Error::file(
                    &adapter.join("adapter_model.safetensors"),
                    format!(
                        "{module}.beft_bias has {} values, the model's bias has {}",
                        delta.numel(),
                        slot.len()
                    ),
                ));
            }
            let base = &t.enc.init[slot.offset..slot.offset + slot.len()];
            delta
                .to_f64_vec()
                .iter()
                .zip(base)
                .map(|(d, b)| b + d)
                .collect()
        } else if let Some(full) = store.try_get(&format!("base_model.model.{module}.bias")) {
            full.to_f64_vec()
        } else {
            // Not in the adapter: unchanged.
            t.enc.init[slot.offset..slot.offset + slot.len()].to_vec()
        };
        values[slot.offset..slot.offset + slot.len()].copy_from_slice(&got);
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), "beft-biases".into());
    meta.insert("beft_version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("base_model".into(), t.md.name.clone());
    meta.insert("base_model_fingerprint".into(), t.md.weights.fingerprint());
    meta.insert("model_type".into(), t.md.config.model_type.clone());
    meta.insert("bias_terms".into(), BiasTerm::format_set(&terms));
    meta.insert("pooling".into(), crate::train::pooling_name(pooling).into());
    meta.insert("num_labels".into(), num_labels.to_string());
    meta.insert("imported_from".into(), adapter.display().to_string());
    if let Some(task) = b.and_then(|b| b["task"].as_str()) {
        meta.insert("task".into(), task.into());
    }
    write_safetensors(
        out,
        &crate::train::slab_tensors(&t.enc.layout, &values),
        &meta,
    )?;
    Ok(out.to_path_buf())
}

fn infer_terms(store: &WeightStore) -> Vec<BiasTerm> {
    let names = store.names();
    let has = |pat: &str| names.iter().any(|n| n.contains(pat));
    let mut t = Vec::new();
    for (pat, term) in [
        ("attention.self.query.beft_bias", BiasTerm::Q),
        ("attention.self.key.beft_bias", BiasTerm::K),
        ("attention.self.value.beft_bias", BiasTerm::V),
        ("attention.output.dense.beft_bias", BiasTerm::O),
        ("intermediate.dense.beft_bias", BiasTerm::MlpIn),
        ("attention.output.LayerNorm.bias", BiasTerm::Ln1),
        ("embeddings.LayerNorm.bias", BiasTerm::EmbLn),
    ] {
        if has(pat) {
            t.push(term);
        }
    }
    // `output.*` also matches `attention.output.*`: tell them apart.
    let mlp_out = |suffix: &str| {
        names
            .iter()
            .any(|n| n.contains(&format!("output.{suffix}")) && !n.contains("attention.output"))
    };
    if mlp_out("dense.beft_bias") {
        t.push(BiasTerm::MlpOut);
    }
    if mlp_out("LayerNorm.bias") {
        t.push(BiasTerm::Ln2);
    }
    if t.is_empty() {
        t.push(BiasTerm::V);
    }
    t.sort();
    t
}
