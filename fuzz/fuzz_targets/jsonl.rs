#![no_main]
#[path = "../harness.rs"]
mod harness;

harness::libfuzzer_target!(harness::jsonl_target);
