#![no_main]
#[path = "../harness.rs"]
mod harness;

harness::libfuzzer_target!(harness::sharded_target);
