//! Model configuration (being written).
