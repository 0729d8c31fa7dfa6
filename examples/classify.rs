//! Embedding beft: load a base model and a trained biases file, classify a
//! few sentences. No CLI code involved — only [`beft::infer::Classifier`].
//!
//! ```sh
//! cargo run --release --example classify -- MODEL_DIR runs/sst2-v/biases.safetensors "a fine film" "a waste of time"
//! ```

use std::path::Path;

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

fn main() -> beft::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: classify MODEL_DIR BIASES.safetensors [SENTENCE...]");
        std::process::exit(2);
    }
    let clf = beft::infer::Classifier::load(Path::new(&args[0]), Path::new(&args[1]))?;
    let default = [
        "a gripping, beautifully acted film",
        "dull, predictable and far too long",
        "the best thing i have seen all year",
    ];
    let texts: Vec<&str> = if args.len() > 2 {
        args[2..].iter().map(|s| s.as_str()).collect()
    } else {
        default.to_vec()
    };
    for (text, (label, prob)) in texts.iter().zip(clf.classify(&texts)?) {
        println!("{label}\t{prob:.4}\t{text}");
    }
    Ok(())
}
