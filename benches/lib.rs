//! Nothing here: the package holds the criterion benches (`engines.rs`), run by
//! `cargo xtask bench`.
