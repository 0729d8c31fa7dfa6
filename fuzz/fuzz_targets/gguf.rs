#![no_main]
#[path = "../harness.rs"]
mod harness;

harness::libfuzzer_target!(harness::gguf_target);
