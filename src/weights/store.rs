//! Safetensors loading (being written).
