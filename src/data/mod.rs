//! Data: task definitions, GLUE/JSONL readers, tokenizer glue, batching and
//! metrics (being written).
