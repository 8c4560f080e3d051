//! Nothing here: the package holds the criterion benches (`engines.rs`, `overhead.rs`,
//! `kernels.rs`), run by `cargo xtask bench`.
