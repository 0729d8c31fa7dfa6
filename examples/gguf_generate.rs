//! Greedy text continuation with a GGUF model (SmolLM2 by default), on the
//! CPU backend: config, weights and tokenizer all come from the one file.
//!
//! ```sh
//! scripts/fetch_smollm2.sh
//! cargo run --release --example gguf_generate -- [MODEL.gguf] ["prompt"] [N_TOKENS]
//! ```
//!
//! Default model: `${BEFT_CACHE:-$HOME/.cache/beft}/models/SmolLM2-135M-Instruct.Q4_1.gguf`.

use std::path::PathBuf;
use std::time::Instant;

use beft::backend::cpu::CpuBackend;
use beft::data::TextTokenizer;
use beft::model::config::ModelDir;
use beft::model::{Decoder, DecoderOptions};
use beft::train::Slab;

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = match args.first() {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("BEFT_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/beft")))
                .ok_or("set BEFT_CACHE or HOME")?;
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    let prompt = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "The capital of France is".to_string());
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(32);

    let t0 = Instant::now();
    let md = ModelDir::open(&model)?;
    let c = &md.config;
    println!(
        "{}: {} layers, hidden {}, {} heads ({} kv), vocab {}, loaded in {:.1}s",
        md.name,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        t0.elapsed().as_secs_f64()
    );
    let tok = TextTokenizer::from_file(&model, 4096)?;
    let be = CpuBackend::<f32>::new();
    let dec = Decoder::load(&be, &md, DecoderOptions::default())?;
    let slab = Slab::new(&be, &dec.init);
    let ids = tok.encode(&prompt, None)?.ids;
    let t1 = Instant::now();
    let eos = c.eos_token_id;
    let out = dec.generate_greedy(&be, &slab.params, &[ids], n, &|t| t.last().copied() == eos)?;
    let text = tok
        .inner()
        .decode(&out[0], true)
        .map_err(|e| format!("decoding: {e}"))?;
    println!("{prompt}{text}");
    println!(
        "({} tokens in {:.2}s)",
        out[0].len(),
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}
