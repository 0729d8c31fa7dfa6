//! Mutation fuzzing, on stable Rust, of every reader of untrusted files: the
//! safetensors header (single files, checkpoints, sharded directories and
//! their index), GGUF (header, dequantization, config, weights and
//! tokenizer), config.json / modules.json / pooling configs, the TSV and
//! JSONL readers, BIG-bench task.json, SQuAD JSON, prompt template files and
//! tokenizer.json.
//!
//! Seeds are the committed fixtures (`tests/fixtures/*`, with small extra
//! seeds in `tests/fixtures/fuzz/seeds/`). Each iteration applies 1–4 stacked
//! mutations (bit flips, interesting bytes, lying 32/64-bit lengths,
//! truncation, range duplication / deletion, random insertions, dictionary
//! tokens, numbers rewritten to extreme values, splicing with another seed),
//! writes the result to a file and opens it through the public API. Every
//! call must return (Ok or an error that names the file) without panicking,
//! and no single allocation may exceed [`MAX_ALLOC`] — a global allocator
//! records the largest request, so a header that lies about a size cannot
//! make a reader reserve gigabytes even lazily.
//!
//! A panic is caught (`catch_unwind`), reported with the target, seed and
//! iteration, and the input is written to `target/fuzz-crashes/TARGET/`;
//! copy it to `tests/fixtures/fuzz/TARGET/` to keep it as a regression seed
//! (every file there is replayed first, on every run). An abort (which
//! `catch_unwind` cannot catch) leaves the last input in
//! `target/fuzz-work/TARGET/`.
//!
//! Default: a smoke run of [`SMOKE_ITERS`] iterations per target, with a
//! fixed seed. `BEFT_FUZZ_ITERS=N` runs N iterations per target,
//! `BEFT_FUZZ_SECS=S` runs each target for S seconds (seeded from the clock
//! unless `BEFT_FUZZ_SEED` is set); `BEFT_FUZZ_SEED` fixes the seed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use beft::data::{self, bigbench, generation, prompts, Split, TextTokenizer};
use beft::model::config::{ModelConfig, ModelDir};
use beft::rng::Rng;
use beft::weights::gguf::{self, GgufFile};
use beft::weights::WeightStore;

// ---------------------------------------------------------------------------
// Allocation tracking
// ---------------------------------------------------------------------------

/// The largest single allocation any reader may request for these inputs
/// (all under 100 KB).
const MAX_ALLOC: usize = 64 << 20;

/// Largest allocation request since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Tracking;

// SAFETY: forwards every call to the system allocator unchanged; only
// records the requested sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Targets run one at a time: the allocation record is global, and the
/// machine running the tests may be small.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

const SMOKE_ITERS: u64 = 300;
const DEFAULT_SEED: u64 = 0xBEF7_F022;

struct Budget {
    iters: Option<u64>,
    secs: Option<f64>,
    seed: u64,
}

fn budget() -> Budget {
    let var = |k: &str| std::env::var(k).ok().filter(|s| !s.trim().is_empty());
    let iters = var("BEFT_FUZZ_ITERS").map(|s| s.trim().parse().expect("BEFT_FUZZ_ITERS"));
    let secs = var("BEFT_FUZZ_SECS").map(|s| s.trim().parse().expect("BEFT_FUZZ_SECS"));
    let seed = match var("BEFT_FUZZ_SEED") {
        Some(s) => s.trim().parse().expect("BEFT_FUZZ_SEED"),
        None if secs.is_some() => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        None => DEFAULT_SEED,
    };
    Budget {
        iters: if iters.is_none() && secs.is_none() {
            Some(SMOKE_ITERS)
        } else {
            iters
        },
        secs,
        seed,
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> Vec<u8> {
    let p = root().join("tests/fixtures").join(rel);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn seed_file(name: &str) -> Vec<u8> {
    fixture(&format!("fuzz/seeds/{name}"))
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// One seed: the file to mutate (written as `dest` inside a fresh
/// directory), the unmutated files beside it, a tag passed to the target
/// (e.g. the task name) and the length of the "hot" prefix that most
/// mutations aim at (a binary header).
struct Seed {
    name: String,
    dest: &'static str,
    bytes: Vec<u8>,
    extras: Vec<(&'static str, Vec<u8>)>,
    tag: &'static str,
    hot: usize,
}

impl Seed {
    fn new(name: &str, dest: &'static str, bytes: Vec<u8>) -> Self {
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
    fn tag(mut self, tag: &'static str) -> Self {
        self.tag = tag;
        self
    }
    fn extra(mut self, name: &'static str, bytes: Vec<u8>) -> Self {
        self.extras.push((name, bytes));
        self
    }
    /// Aim at the safetensors header (8-byte length + JSON).
    fn safetensors_hot(mut self) -> Self {
        let n = u64::from_le_bytes(self.bytes[..8].try_into().unwrap()) as usize;
        self.hot = (8 + n).min(self.bytes.len());
        self
    }
    /// Aim at the GGUF header (metadata and tensor infos).
    fn gguf_hot(mut self) -> Self {
        let g = GgufFile::from_bytes(Path::new("seed"), std::sync::Arc::new(self.bytes.clone()))
            .expect("GGUF seed parses");
        self.hot = g.data_start().min(self.bytes.len());
        self
    }
}

/// A reader's result: `Err` holds an error message from a reader of the
/// mutated file, which must name the file (its directory is checked).
type Outcome = Result<(), String>;

struct Target {
    name: &'static str,
    seeds: Vec<Seed>,
    /// Extra tokens that mutations insert (besides the generic ones).
    dict: &'static [&'static str],
    run: fn(&Path, &str) -> Outcome,
}

fn msg(e: beft::Error) -> String {
    e.to_string()
}

/// Read what a weight store holds the way the engine does.
fn exercise_store(s: &WeightStore) {
    let _ = s.fingerprint();
    for name in s.names() {
        let t = s.get(name).expect("listed tensor");
        let v = t.to_f32_vec();
        assert_eq!(v.len(), t.numel());
    }
    let _ = s.get("no.such.tensor.LayerNorm.weight");
    let _ = s.get("position_ids");
}

fn safetensors_target() -> Target {
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
    beft::train::checkpoint::save(&ck, &[1.0; 5], &[0.5; 5], &[0.25; 5], &state).unwrap();
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
                let (params, m, v, _) = ck.map_err(msg)?;
                assert_eq!((params.len(), m.len(), v.len()), (5, 5, 5));
            }
            Ok(())
        },
    }
}

fn sharded_target() -> Target {
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

fn config_target() -> Target {
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

fn gguf_target() -> Target {
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
fn tiny_tokenizer() -> TextTokenizer {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("tokenizer.json");
    fs::write(&p, seed_file("wordpiece_tokenizer.json")).unwrap();
    TextTokenizer::from_file(&p, 32).unwrap()
}

thread_local! {
    static TOK: TextTokenizer = tiny_tokenizer();
}

fn tsv_target() -> Target {
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

fn jsonl_target() -> Target {
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

fn bigbench_target() -> Target {
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

fn templates_target() -> Target {
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

fn tokenizer_target() -> Target {
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

// ---------------------------------------------------------------------------
// Mutation
// ---------------------------------------------------------------------------

const GENERIC_DICT: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "\\",
    "\\u0000",
    "0",
    "-1",
    "1e308",
    "null",
    "true",
    "18446744073709551615",
    "9223372036854775808",
    "4294967296",
];

const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "255",
    "65536",
    "2147483647",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e38",
    "1e39",
    "1e308",
    "1e400",
    "-0.0",
    "0.5",
    "NaN",
];

fn interesting_u64(len: usize, rng: &mut Rng) -> u64 {
    let l = len as u64;
    let v = [
        0,
        1,
        u64::MAX,
        u64::MAX / 2,
        1 << 63,
        1 << 40,
        1 << 32,
        u32::MAX as u64,
        i32::MAX as u64,
        100_000_000,
        100_000_001,
        l,
        l + 1,
        l.saturating_sub(8),
        l * 2,
        32,
    ];
    v[rng.below(v.len())]
}

/// A position, most often inside the hot prefix.
fn pos(rng: &mut Rng, len: usize, hot: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if hot > 0 && hot < len && rng.below(10) < 8 {
        rng.below(hot)
    } else {
        rng.below(len)
    }
}

fn mutate(
    b: &mut Vec<u8>,
    hot: usize,
    dict: &[&str],
    others: &[&Seed],
    rng: &mut Rng,
) -> &'static str {
    let len = b.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = pos(rng, len, hot);
            b[i] ^= 1 << rng.below(8);
            "bit flip"
        }
        1 if len > 0 => {
            let i = pos(rng, len, hot);
            let v = [
                0u8, 0xff, 0x7f, 0x80, 1, b'"', b'{', b'9', b'\t', b'\n', b'-', b'.',
            ];
            b[i] = v[rng.below(v.len())];
            "interesting byte"
        }
        2 if len >= 8 => {
            let i = pos(rng, len - 7, hot);
            let v = interesting_u64(len, rng);
            if rng.below(2) == 0 {
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                "u64 overwrite"
            } else {
                b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                "u32 overwrite"
            }
        }
        3 => {
            let at = pos(rng, len + 1, hot);
            b.truncate(at);
            "truncate"
        }
        4 if len > 0 => {
            let s = pos(rng, len, hot);
            let n = 1 + rng.below((len - s).min(256));
            let chunk = b[s..s + n].to_vec();
            let at = pos(rng, len + 1, hot);
            b.splice(at..at, chunk);
            "duplicate range"
        }
        5 if len > 0 => {
            let s = pos(rng, len, hot);
            let n = 1 + rng.below((len - s).min(64));
            b.drain(s..s + n);
            "delete range"
        }
        6 => {
            let at = pos(rng, len + 1, hot);
            let n = 1 + rng.below(16);
            let ins: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            b.splice(at..at, ins);
            "insert random"
        }
        7 | 8 => {
            let d = if rng.below(3) == 0 {
                GENERIC_DICT
            } else {
                dict
            };
            let d = if d.is_empty() { GENERIC_DICT } else { d };
            let tok = d[rng.below(d.len())].as_bytes();
            let at = pos(rng, len + 1, hot);
            if rng.below(2) == 0 || at + tok.len() > len {
                b.splice(at..at, tok.iter().copied());
                "insert token"
            } else {
                b[at..at + tok.len()].copy_from_slice(tok);
                "overwrite token"
            }
        }
        9 => {
            // Rewrite a run of ASCII digits as an extreme number.
            let start = pos(rng, len + 1, hot);
            let Some(i) = (start..len).find(|&i| b[i].is_ascii_digit()) else {
                return "no digits";
            };
            let mut j = i;
            while j < len && (b[j].is_ascii_digit() || b[j] == b'.') {
                j += 1;
            }
            let n = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
            b.splice(i..j, n.bytes());
            "number"
        }
        _ => {
            if let Some(o) = others.get(rng.below(others.len().max(1))) {
                let cut = pos(rng, len + 1, hot);
                let from = rng.below(o.bytes.len() + 1);
                b.truncate(cut);
                b.extend_from_slice(&o.bytes[from..]);
                "splice"
            } else {
                "no splice"
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Per-target results.
#[derive(Default)]
struct Stats {
    iters: u64,
    ok: u64,
    err: u64,
    largest_alloc: usize,
    slowest: Duration,
    failures: Vec<String>,
    /// Failing mutated inputs (only the first [`MAX_REPORTED`] are listed and saved).
    failed: u64,
}

const MAX_REPORTED: u64 = 20;

/// Run `p` through the target, checking for panics, absurd allocations and
/// errors that do not name the file. `None`: fine.
fn check_one(t: &Target, p: &Path, dir: &Path, tag: &str, st: &mut Stats) -> Option<String> {
    LARGEST.store(0, Ordering::SeqCst);
    let t0 = Instant::now();
    let r = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(p, tag)));
    st.slowest = st.slowest.max(t0.elapsed());
    let largest = LARGEST.load(Ordering::SeqCst);
    st.largest_alloc = st.largest_alloc.max(largest);
    st.iters += 1;
    let problem = match r {
        Err(payload) => {
            let m = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Some(format!("panicked: {m}"))
        }
        Ok(Ok(())) => {
            st.ok += 1;
            None
        }
        Ok(Err(m)) => {
            st.err += 1;
            let d = dir.display().to_string();
            (!m.contains(&d)).then(|| format!("error does not name the file: {m}"))
        }
    };
    problem.or_else(|| {
        (largest > MAX_ALLOC)
            .then(|| format!("allocated {largest} bytes in one request (limit {MAX_ALLOC})"))
    })
}

fn write_setup(dir: &Path, seed: &Seed) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    for (name, bytes) in &seed.extras {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    fs::create_dir_all(dir.join(seed.dest).parent().unwrap()).unwrap();
}

fn save_crash(t: &Target, name: &str, bytes: &[u8]) -> PathBuf {
    let d = root().join("target/fuzz-crashes").join(t.name);
    fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn fuzz(make: fn() -> Target) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = make();
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
    let b = budget();
    let work = root().join("target/fuzz-work").join(t.name);
    let _ = fs::remove_dir_all(&work);
    let mut st = Stats::default();
    // Quiet panics: they are caught and reported below.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));

    // Every seed, unmutated, and every kept regression input first.
    let mut replay: Vec<(usize, String, Vec<u8>)> = Vec::new();
    for (i, s) in t.seeds.iter().enumerate() {
        replay.push((i, format!("seed {}", s.name), s.bytes.clone()));
    }
    let reg = root().join("tests/fixtures/fuzz").join(t.name);
    if let Ok(entries) = fs::read_dir(&reg) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let fname = f.file_name().unwrap().to_string_lossy().into_owned();
            let seed_name = fname.split("__").next().unwrap_or("");
            let i = t
                .seeds
                .iter()
                .position(|s| s.name == seed_name)
                .unwrap_or_else(|| panic!("{}: no seed named '{seed_name}'", f.display()));
            replay.push((
                i,
                format!("regression {}", f.display()),
                fs::read(&f).unwrap(),
            ));
        }
    }
    for (i, what, bytes) in &replay {
        let s = &t.seeds[*i];
        let dir = work.join(format!("replay{i}"));
        write_setup(&dir, s);
        let p = dir.join(s.dest);
        fs::write(&p, bytes).unwrap();
        if let Some(problem) = check_one(&t, &p, &dir, s.tag, &mut st) {
            st.failures.push(format!("{}: {what}: {problem}", t.name));
        }
    }

    // Mutated inputs.
    for (i, s) in t.seeds.iter().enumerate() {
        write_setup(&work.join(format!("seed{i}")), s);
    }
    let start = Instant::now();
    let mut iter = 0u64;
    loop {
        if b.iters.is_some_and(|n| iter >= n) {
            break;
        }
        if b.secs.is_some_and(|s| start.elapsed().as_secs_f64() >= s) {
            break;
        }
        let mut rng = Rng::new(b.seed ^ hash(t.name) ^ iter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let i = rng.below(t.seeds.len());
        let s = &t.seeds[i];
        let others: Vec<&Seed> = t.seeds.iter().collect();
        let mut bytes = s.bytes.clone();
        let mut applied = Vec::new();
        for _ in 0..[1, 1, 1, 1, 2, 2, 3, 4][rng.below(8)] {
            let hot = s.hot.min(bytes.len());
            applied.push(mutate(&mut bytes, hot, t.dict, &others, &mut rng));
        }
        let dir = work.join(format!("seed{i}"));
        let p = dir.join(s.dest);
        fs::write(&p, &bytes).unwrap();
        if let Some(problem) = check_one(&t, &p, &dir, s.tag, &mut st) {
            st.failed += 1;
            if st.failed > MAX_REPORTED {
                iter += 1;
                continue;
            }
            let saved = save_crash(&t, &format!("{}__s{}_i{iter}", s.name, b.seed), &bytes);
            st.failures.push(format!(
                "{}: seed {} iteration {iter} (mutations {applied:?}, BEFT_FUZZ_SEED={}): {problem}; input saved to {}",
                t.name,
                s.name,
                b.seed,
                saved.display()
            ));
        }
        iter += 1;
    }
    panic::set_hook(hook);
    let failed = st.failures.len() as u64 + st.failed.saturating_sub(MAX_REPORTED);
    println!(
        "fuzz {}: {} inputs ({} mutated, seed {}) in {:.1}s: {} ok, {} errors, {} failures; largest allocation {} bytes, slowest input {:?}",
        t.name,
        st.iters,
        iter,
        b.seed,
        start.elapsed().as_secs_f64(),
        st.ok,
        st.err,
        failed,
        st.largest_alloc,
        st.slowest
    );
    assert!(
        st.failures.is_empty(),
        "{failed} failing inputs (the first {} listed):\n{}",
        st.failures.len(),
        st.failures.join("\n")
    );
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn fuzz_safetensors() {
    fuzz(safetensors_target);
}

#[test]
fn fuzz_sharded_safetensors() {
    fuzz(sharded_target);
}

#[test]
fn fuzz_config() {
    fuzz(config_target);
}

#[test]
fn fuzz_gguf() {
    fuzz(gguf_target);
}

#[test]
fn fuzz_tsv() {
    fuzz(tsv_target);
}

#[test]
fn fuzz_jsonl() {
    fuzz(jsonl_target);
}

#[test]
fn fuzz_bigbench_and_squad() {
    fuzz(bigbench_target);
}

#[test]
fn fuzz_templates() {
    fuzz(templates_target);
}

#[test]
fn fuzz_tokenizer() {
    fuzz(tokenizer_target);
}

/// The allocation check itself: a large request is seen even when its
/// memory is never touched.
#[test]
fn allocation_tracking_sees_untouched_large_requests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::SeqCst);
    let v: Vec<u8> = Vec::with_capacity(2 * MAX_ALLOC);
    assert!(LARGEST.load(Ordering::SeqCst) >= 2 * MAX_ALLOC);
    drop(v);
}
