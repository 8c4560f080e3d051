//! With the `tch` feature: an rpath to libtorch's folder for the `convkit` binary, tests,
//! examples and benches, so they run without LD_LIBRARY_PATH; and `libtorch_cuda` kept
//! linked (the linker drops it under `--as-needed`, and CUDA then silently goes unseen).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_CONVKIT_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_CONVKIT_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var("DEP_CONVKIT_TCH_LIBTORCH_CUDA").is_ok() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
        }
    }
}
