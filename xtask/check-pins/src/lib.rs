//! Feature pins for `cargo xtask test`'s single-feature checks; see this package's Cargo.toml.
