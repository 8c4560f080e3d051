//! Passes libtorch's library folder on (rpath for this crate's tests, and to the facade via
//! `links`), and keeps `libtorch_cuda` linked: the linker drops it under `--as-needed`, and
//! then CUDA is silently never seen.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:libtorch_lib={lib}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
            println!("cargo:libtorch_cuda=1");
        }
    }
}
