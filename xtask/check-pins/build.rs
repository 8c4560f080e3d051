//! Present so that cargo resolves the `[build-dependencies]` pins.
fn main() {}
