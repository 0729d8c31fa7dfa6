//! The fuzz targets, shared by the stable-Rust mutation fuzzer
//! (`tests/fuzz.rs`, included with `#[path]`) and the cargo-fuzz/libFuzzer
//! targets in `fuzz/fuzz_targets/`: for each reader of untrusted files, its
//! seeds (a file to mutate, the unmutated files beside it, a tag such as the
//! task name) and what to do with a mutated file (open it through the public
//! API the way the engine does). A target returns `Ok`, or an error message
//! that must name the file; a panic or an absurd allocation is a finding.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use beft::data::{self, bigbench, generation, prompts, Split, TextTokenizer};
use beft::model::config::{ModelConfig, ModelDir};
use beft::weights::gguf::{self, GgufFile};
use beft::weights::WeightStore;

/// The repository root (this file is compiled both by `tests/fuzz.rs` and by
/// the cargo-fuzz crate in `fuzz/`).
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.ends_with("fuzz") {
        here.parent().unwrap().to_path_buf()
    } else {
        here.to_path_buf()
    }
}

pub fn fixture(rel: &str) -> Vec<u8> {
    let p = root().join("tests/fixtures").join(rel);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn seed_file(name: &str) -> Vec<u8> {
    fixture(&format!("fuzz/seeds/{name}"))
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// One seed: the file to mutate (written as `dest` inside a fresh
/// directory), the unmutated files beside it, a tag passed to the target
/// (e.g. the task name) and the length of the "hot" prefix that most
/// mutations aim at (a binary header).
pub struct Seed {
    pub name: String,
    pub dest: &'static str,
    pub bytes: Vec<u8>,
    pub extras: Vec<(&'static str, Vec<u8>)>,
    pub tag: &'static str,
    pub hot: usize,
}

impl Seed {
    pub fn new(name: &str, dest: &'static str, bytes: Vec<u8>) -> Self {
        let hot = bytes.len();
        Seed {
            name: name.to_string(),
            dest,
            bytes,
            extras: Vec::new(),
            tag: "",
            hot,
        }
    }
    pub fn tag(mut self, tag: &'static str) -> Self {
        self.tag = tag;
        self
    }
    pub fn extra(mut self, name: &'static str, bytes: Vec<u8>) -> Self {
        self.extras.push((name, bytes));
        self
    }
    /// Aim at the safetensors header (8-byte length + JSON).
    pub fn safetensors_hot(mut self) -> Self {
        let n = u64::from_le_bytes(self.bytes[..8].try_into().unwrap()) as usize;
        self.hot = (8 + n).min(self.bytes.len());
        self
    }
    /// Aim at the GGUF header (metadata and tensor infos).
    pub fn gguf_hot(mut self) -> Self {
        let g = GgufFile::from_bytes(Path::new("seed"), std::sync::Arc::new(self.bytes.clone()))
            .expect("GGUF seed parses");
        self.hot = g.data_start().min(self.bytes.len());
        self
    }
}

/// A reader's result: `Err` holds an error message from a reader of the
/// mutated file, which must name the file (its directory is checked).
pub type Outcome = Result<(), String>;

pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Seed>,
    /// Extra tokens that mutations insert (besides the generic ones).
    pub dict: &'static [&'static str],
    pub run: fn(&Path, &str) -> Outcome,
}

pub fn msg(e: beft::Error) -> String {
    e.to_string()
}

/// Read what a weight store holds the way the engine does.
pub fn exercise_store(s: &WeightStore) {
    let _ = s.fingerprint();
    for name in s.names() {
        let t = s.get(name).expect("listed tensor");
        let v = t.to_f32_vec();
        assert_eq!(v.len(), t.numel());
    }
    let _ = s.get("no.such.tensor.LayerNorm.weight");
    let _ = s.get("position_ids");
}

pub fn safetensors_target() -> Target {
    // A beft checkpoint, written by the checkpoint writer.
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck.safetensors");
    let state = beft::train::checkpoint::LoopState {
        step: 3,
        epoch: 1,
        step_secs: vec![0.25, 0.5],
        best: Some((0.5, 1)),
        ..Default::default()
    };
    beft::train::checkpoint::save(&ck, &[1.0; 5], &[0.5; 5], &[0.25; 5], None, &state).unwrap();
    Target {
        name: "safetensors",
        seeds: vec![
            Seed::new("tiny", "model.safetensors", seed_file("tiny.safetensors")).safetensors_hot(),
            Seed::new("checkpoint", "model.safetensors", fs::read(&ck).unwrap())
                .safetensors_hot()
                .tag("checkpoint"),
            Seed::new(
                "bert_cls_bf16",
                "model.safetensors",
                fixture("bert_cls_bf16/model/model.safetensors"),
            )
            .safetensors_hot(),
            Seed::new(
                "shard2",
                "model.safetensors",
                fixture("bert_cls_sharded/model/model-00002-of-00002.safetensors"),
            )
            .safetensors_hot(),
        ],
        dict: &[
            "\"F32\"",
            "\"F16\"",
            "\"BF16\"",
            "\"I64\"",
            "\"F8_E4M3\"",
            "\"dtype\"",
            "\"shape\"",
            "\"data_offsets\"",
            "\"__metadata__\"",
            "\"state\"",
            "[0, 0]",
            "[]",
            "[0]",
        ],
        run: |p, tag| {
            let s = WeightStore::open_file(p).map_err(msg)?;
            exercise_store(&s);
            // The checkpoint reader (its state JSON, slab lengths).
            let ck = beft::train::checkpoint::load(p, 5);
            if tag == "checkpoint" {
                let (params, m, v, _, _) = ck.map_err(msg)?;
                assert_eq!((params.len(), m.len(), v.len()), (5, 5, 5));
            }
            Ok(())
        },
    }
}

pub fn sharded_target() -> Target {
    let index = fixture("bert_cls_sharded/model/model.safetensors.index.json");
    let s1 = fixture("bert_cls_sharded/model/model-00001-of-00002.safetensors");
    let s2 = fixture("bert_cls_sharded/model/model-00002-of-00002.safetensors");
    Target {
        name: "sharded",
        seeds: vec![
            Seed::new("index", "model.safetensors.index.json", index.clone())
                .extra("model-00001-of-00002.safetensors", s1.clone())
                .extra("model-00002-of-00002.safetensors", s2.clone()),
            Seed::new("shard1", "model-00001-of-00002.safetensors", s1)
                .safetensors_hot()
                .extra("model.safetensors.index.json", index)
                .extra("model-00002-of-00002.safetensors", s2),
        ],
        dict: &[
            "\"weight_map\"",
            "\"..\"",
            "\"/etc/passwd\"",
            "\"model-00002-of-00002.safetensors\"",
            "\"model-00001-of-00002.safetensors\"",
            "\"sub/x.safetensors\"",
            "{}",
            "\"data_offsets\"",
        ],
        run: |p, _| {
            let s = WeightStore::open_dir(p.parent().unwrap()).map_err(msg)?;
            exercise_store(&s);
            Ok(())
        },
    }
}

pub fn config_target() -> Target {
    let mut seeds = Vec::new();
    for case in [
        "bert_cls",
        "roberta_cls",
        "bert_pair_regression",
        "gpt2_lm",
        "opt_lm",
        "opt_postln_lm",
        "llama_lm",
        "qwen2_lm",
    ] {
        let leaked: &'static str = Box::leak(case.to_string().into_boxed_str());
        seeds.push(
            Seed::new(
                case,
                "config.json",
                fixture(&format!("{case}/model/config.json")),
            )
            .tag(leaked),
        );
    }
    seeds.push(Seed::new(
        "tiny",
        "config.json",
        seed_file("tiny_config.json"),
    ));
    // The sentence-transformers files of a full model directory.
    let mean = |f: &str| fixture(&format!("bert_mean/model/{f}"));
    let files = ["config.json", "modules.json", "1_Pooling/config.json"];
    for (i, dest) in files.into_iter().enumerate() {
        let mut s = Seed::new(&format!("bert_mean_{i}"), dest, mean(dest)).tag("dir");
        for other in files.into_iter().filter(|f| *f != dest) {
            s = s.extra(other, mean(other));
        }
        seeds.push(s.extra("model.safetensors", mean("model.safetensors")));
    }
    Target {
        name: "config",
        seeds,
        dict: &[
            "\"model_type\"",
            "\"bert\"",
            "\"llama\"",
            "\"qwen2\"",
            "\"gpt2\"",
            "\"opt\"",
            "\"roberta\"",
            "\"hidden_size\"",
            "\"num_attention_heads\"",
            "\"num_key_value_heads\"",
            "\"head_dim\"",
            "\"rope_scaling\"",
            "\"vocab_size\"",
            "\"max_position_embeddings\"",
            "\"layer_norm_eps\"",
            "\"path\"",
            "\"../..\"",
            "\"sentence_transformers.models.Pooling\"",
            "\"pooling_mode_mean_tokens\"",
            "true",
            "null",
            "0",
            "-1",
            "1e-400",
            "1e400",
        ],
        run: |p, tag| {
            let dir = p.parent().unwrap();
            if tag == "dir" {
                let dir = if p.ends_with("1_Pooling/config.json") {
                    dir.parent().unwrap()
                } else {
                    dir
                };
                let md = ModelDir::open(dir).map_err(msg)?;
                let _ = md.config.head_dim();
                return Ok(());
            }
            let c = ModelConfig::from_file(p).map_err(msg)?;
            let _ = c.head_dim();
            Ok(())
        },
    }
}

pub fn gguf_target() -> Target {
    Target {
        name: "gguf",
        seeds: vec![
            Seed::new("quants", "model.gguf", fixture("gguf/quants.gguf")).gguf_hot(),
            Seed::new("tiny_llama", "model.gguf", seed_file("tiny_llama.gguf")).gguf_hot(),
        ],
        dict: &[
            "GGUF",
            "general.alignment",
            "llama.block_count",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "token_embd.weight",
            "blk.0.attn_q.weight",
        ],
        run: |p, _| {
            let g = GgufFile::open(p).map_err(msg)?;
            for t in g.tensors() {
                if let Ok(v) = g.dequantize(t) {
                    assert_eq!(v.len(), t.numel());
                }
            }
            let _ = g.architecture();
            let cfg = gguf::hf_config(&g);
            if let Ok(s) = gguf::load_weights(&g) {
                exercise_store(&s);
            }
            if let Ok(tk) = gguf::build_tokenizer(&g) {
                let _ = tk.encode("abc 12 <tool>", true);
            }
            if cfg.is_ok() {
                ModelDir::open(p).map_err(msg)?;
            }
            let tk = TextTokenizer::from_file(p, 16);
            if let Ok(tk) = tk {
                let _ = tk.encode("ab c", Some("12"));
            }
            Ok(())
        },
    }
}

/// The WordPiece tokenizer used to encode what the data readers return.
pub fn tiny_tokenizer() -> TextTokenizer {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("tokenizer.json");
    fs::write(&p, seed_file("wordpiece_tokenizer.json")).unwrap();
    TextTokenizer::from_file(&p, 32).unwrap()
}

thread_local! {
    static TOK: TextTokenizer = tiny_tokenizer();
}

pub fn tsv_target() -> Target {
    Target {
        name: "tsv",
        seeds: vec![
            Seed::new("sst2", "train.tsv", seed_file("sst2.tsv")).tag("sst2"),
            Seed::new("mrpc", "train.tsv", seed_file("mrpc.tsv")).tag("mrpc"),
            Seed::new("stsb", "train.tsv", seed_file("stsb.tsv")).tag("stsb"),
            Seed::new("cola", "train.tsv", seed_file("cola.tsv")).tag("cola"),
            Seed::new("qqp", "train.tsv", seed_file("qqp.tsv")).tag("qqp"),
            Seed::new("mnli", "train.tsv", seed_file("mnli.tsv")).tag("mnli"),
        ],
        dict: &[
            "\t",
            "\n",
            "\r\n",
            "\u{feff}",
            "\u{0}",
            "sentence",
            "label",
            "NaN",
            "inf",
            "-0",
            "1e39",
            "entailment",
            "\t\t\t",
        ],
        run: |p, tag| {
            let spec = data::task(tag).unwrap();
            let ex = data::load_split(&spec, p.parent().unwrap(), Split::Train).map_err(msg)?;
            let spec = spec.resolve(&ex).map_err(msg)?;
            let _ = data::sample_subset(&ex, Some(2), 1);
            let enc = TOK.with(|t| t.encode_all(&ex)).map_err(msg)?;
            let labels: Vec<f32> = ex.iter().map(|e| e.label).collect();
            let refs: Vec<_> = enc.iter().collect();
            let b = data::make_batch(&refs, &labels, 0);
            assert_eq!(b.labels.len(), ex.len());
            assert!(spec.num_labels >= 1);
            // The decoder path reads the same files as records.
            if let Ok(recs) = prompts::load_records(tag, p.parent().unwrap(), Split::Train, 1) {
                let t = prompts::Templates::load(None).unwrap();
                if let Ok(tpl) = t.get(tag) {
                    let _ = prompts::to_mc(tpl, &recs);
                }
            }
            Ok(())
        },
    }
}

pub fn jsonl_target() -> Target {
    Target {
        name: "jsonl",
        seeds: vec![
            Seed::new("jsonl", "train.jsonl", seed_file("train.jsonl")).tag("jsonl"),
            Seed::new("jsonl_reg", "train.jsonl", seed_file("train.jsonl")).tag("jsonl-regression"),
            Seed::new("cb", "train.jsonl", seed_file("cb.jsonl")).tag("cb"),
            Seed::new("copa", "train.jsonl", seed_file("copa.jsonl")).tag("copa"),
            Seed::new("boolq", "train.jsonl", seed_file("boolq.jsonl")).tag("boolq"),
        ],
        dict: &[
            "\"text\"",
            "\"text_pair\"",
            "\"label\"",
            "null",
            "true",
            "false",
            "1e400",
            "-1",
            "4294967296",
            "18446744073709551616",
            "0.5",
            "\"\\ud800\"",
            "\"cause\"",
            "\"effect\"",
            "\"premise\"",
            "\"choice1\"",
            "\"entailment\"",
            "{}",
            "[]",
        ],
        run: |p, tag| {
            let dir = p.parent().unwrap();
            match tag {
                "jsonl" | "jsonl-regression" => {
                    let spec = data::task(tag).unwrap();
                    let ex = data::load_split(&spec, dir, Split::Train).map_err(msg)?;
                    let spec = match spec.resolve(&ex) {
                        Ok(s) => s,
                        // Too many classes: a message without a file (the data decides).
                        Err(e) if e.to_string().contains("classes") => return Ok(()),
                        Err(e) => return Err(msg(e)),
                    };
                    let _ = data::jsonl_num_labels(&ex);
                    let _ = spec.label_names();
                    TOK.with(|t| t.encode_all(&ex)).map_err(msg)?;
                }
                _ => {
                    let recs = prompts::load_records(tag, dir, Split::Train, 1).map_err(msg)?;
                    let t = prompts::Templates::load(None).unwrap();
                    let _ = prompts::to_mc(t.get(tag).unwrap(), &recs);
                }
            }
            Ok(())
        },
    }
}

pub fn bigbench_target() -> Target {
    Target {
        name: "bigbench",
        seeds: vec![
            Seed::new("task", "task.json", seed_file("task.json")),
            Seed::new("squad", "train.json", seed_file("squad.json")).tag("squad"),
        ],
        dict: &[
            "\"examples\"",
            "\"input\"",
            "\"target_scores\"",
            "\"example_input_prefix\"",
            "\"data\"",
            "\"paragraphs\"",
            "\"qas\"",
            "\"answers\"",
            "\"context\"",
            "null",
            "1e400",
            "-1e400",
            "{}",
            "[]",
        ],
        run: |p, tag| {
            let dir = p.parent().unwrap();
            if tag == "squad" {
                let ex = generation::read_squad(p).map_err(msg)?;
                for e in &ex {
                    let _ = generation::best_f1_em("an answer", &e.answers);
                }
                return Ok(());
            }
            let all = bigbench::read_task(dir).map_err(msg)?;
            let t = prompts::Templates::load(None).unwrap();
            let _ = prompts::to_mc(t.get("bigbench").unwrap(), &all);
            for split in [Split::Train, Split::Dev] {
                match bigbench::load_split(dir, split, 7) {
                    Ok(r) => assert!(!r.is_empty()),
                    Err(e) => return Err(msg(e)),
                }
            }
            Ok(())
        },
    }
}

pub fn templates_target() -> Target {
    Target {
        name: "templates",
        seeds: vec![Seed::new(
            "default",
            "templates.json",
            fs::read(root().join("templates/default.json")).unwrap(),
        )],
        dict: &[
            "{",
            "}",
            "{{",
            "}}",
            "{text}",
            "\"prompt\"",
            "\"options\"",
            "\"choice\"",
            "\"target\"",
            "null",
            "[]",
            "[\"a\"]",
            "\"_c\"",
        ],
        run: |p, _| {
            let t = prompts::Templates::load(Some(p)).map_err(msg)?;
            let mut fields = BTreeMap::new();
            for k in [
                "text",
                "text_pair",
                "premise",
                "hypothesis",
                "input",
                "choice",
            ] {
                fields.insert(k.to_string(), "x".to_string());
            }
            for name in t.names() {
                let tpl = t.get(&name).unwrap();
                let _ = prompts::render(&tpl.prompt, &fields);
                let rec = prompts::Record {
                    fields: fields.clone(),
                    label: 0,
                    choices: vec!["a".into(), "b".into()],
                };
                let _ = prompts::to_mc(tpl, &[rec]);
            }
            Ok(())
        },
    }
}

pub fn tokenizer_target() -> Target {
    Target {
        name: "tokenizer",
        seeds: vec![
            Seed::new(
                "wordpiece",
                "tokenizer.json",
                seed_file("wordpiece_tokenizer.json"),
            ),
            Seed::new("bpe", "tokenizer.json", seed_file("bpe_tokenizer.json")),
        ],
        dict: &[
            "\"type\"",
            "\"WordPiece\"",
            "\"BPE\"",
            "\"ByteLevel\"",
            "\"Split\"",
            "\"Regex\"",
            "\"TemplateProcessing\"",
            "\"vocab\"",
            "\"merges\"",
            "\"added_tokens\"",
            "\"id\"",
            "\"ids\"",
            "\"pad_id\"",
            "\"max_length\"",
            "\"Fixed\"",
            "null",
            "0",
            "-1",
            "4294967295",
            "4294967296",
            "\"(a*)*b\"",
            "\"\"",
        ],
        run: |p, _| {
            let t = TextTokenizer::from_file(p, 16).map_err(msg)?;
            let _ = t.vocab_size();
            let _ = t.pad_id();
            t.encode("hello world good movies", Some("abc 12"))
                .map_err(msg)?;
            t.encode("", None).map_err(msg)?;
            Ok(())
        },
    }
}

pub fn write_setup(dir: &Path, seed: &Seed) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    for (name, bytes) in &seed.extras {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    fs::create_dir_all(dir.join(seed.dest).parent().unwrap()).unwrap();
}

/// What is wrong with an outcome, if anything: an error must name the
/// directory the mutated file was written to.
pub fn problem(dir: &Path, outcome: &Outcome) -> Option<String> {
    match outcome {
        Ok(()) => None,
        Err(m) => {
            let d = dir.display().to_string();
            (!m.contains(&d)).then(|| format!("error does not name the file: {m}"))
        }
    }
}

/// A target whose seed directories are written once, for byte-at-a-time
/// fuzzers (libFuzzer): the first input byte picks the seed (its file name,
/// the files beside it and its tag), the rest is the file's content.
pub struct Prepared {
    pub target: Target,
    pub work: PathBuf,
}

impl Prepared {
    pub fn new(make: fn() -> Target) -> Self {
        let target = make();
        let work =
            std::env::temp_dir().join(format!("beft-fuzz-{}-{}", target.name, std::process::id()));
        for (i, s) in target.seeds.iter().enumerate() {
            write_setup(&work.join(format!("seed{i}")), s);
        }
        Prepared { target, work }
    }

    /// The corpus entry for seed `i` holding `bytes`.
    pub fn entry(i: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.push(i as u8);
        v.extend_from_slice(bytes);
        v
    }

    /// Run one corpus entry; `Some(problem)` for an error that does not name
    /// the file (panics propagate to the caller).
    pub fn run(&self, data: &[u8]) -> Option<String> {
        let (&first, bytes) = data.split_first()?;
        let i = first as usize % self.target.seeds.len();
        let s = &self.target.seeds[i];
        let dir = self.work.join(format!("seed{i}"));
        let p = dir.join(s.dest);
        fs::write(&p, bytes).unwrap();
        problem(&dir, &(self.target.run)(&p, s.tag))
    }
}

impl Prepared {
    /// Write every seed, as a corpus entry, to `fuzz/corpus/NAME/seed-SEED`
    /// (libFuzzer reads the corpus after its initialisation hook, which
    /// calls this, so a fresh checkout fuzzes from the seeds).
    pub fn write_seed_corpus(&self) {
        let dir = root().join("fuzz/corpus").join(self.target.name);
        fs::create_dir_all(&dir).unwrap();
        for (i, s) in self.target.seeds.iter().enumerate() {
            fs::write(
                dir.join(format!("seed-{}", s.name)),
                Self::entry(i, &s.bytes),
            )
            .unwrap();
        }
    }
}

/// A cargo-fuzz target for one of the targets above: an error that does
/// not name the file is turned into a panic, so libFuzzer reports it like a
/// crash; run with `-malloc_limit_mb=64` to catch allocations that trust a
/// lying header (scripts/fuzz.sh does).
#[allow(unused_macros)]
macro_rules! libfuzzer_target {
    ($make:path) => {
        static PREPARED: std::sync::OnceLock<harness::Prepared> = std::sync::OnceLock::new();
        libfuzzer_sys::fuzz_target!(
            init: {
                let p = harness::Prepared::new($make);
                p.write_seed_corpus();
                let _ = PREPARED.set(p);
            },
            |data: &[u8]| {
                if let Some(problem) = PREPARED.get().unwrap().run(data) {
                    panic!("{problem}");
                }
            }
        );
    };
}
#[allow(unused_imports)]
pub(crate) use libfuzzer_target;
