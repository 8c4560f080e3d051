//! `cargo xtask gpu-bundle [--out DIR]`: everything a GPU machine needs to run convkit's CUDA
//! engines, built here on a CPU machine, in one folder small enough to carry there.
//!
//! A GPU machine of this project has a driver, CUDA 13 and NVRTC, but no Rust toolchain and no
//! network, and takes at most 64 MiB of extra files (docs/contributing.md). So the bundle holds:
//! - `bin/convkit.xz`: a stripped release build with `candle-cuda`, `burn-cuda` and the CPU
//!   engines candle-cpu and burn-flex (not tch: its libtorch is not on the GPU machine),
//!   compressed (174 MB stripped, 25 MB with xz; the script unpacks it). candle's
//!   kernels are compiled to PTX for the H100/H200 (sm_90) by nvcc from the Python registry's
//!   CUDA 13.0 wheels ([`TOOLKIT`]), installed into the cache; candle and burn load the driver,
//!   cuBLAS and NVRTC when they start a device (cudarc's dynamic loading), so the binary starts
//!   on a machine without them and finds the GPU machine's own.
//! - `lib/libcudart.so.13`: the CUDA runtime that candle's statically built kernels link.
//! - `cuda-include.tar.xz`: CUDA 13.0's headers (22 MB, 1.4 MB packed), which NVRTC compiles
//!   burn-cuda's kernels against, for a GPU machine without them in `/usr/local/cuda`.
//! - `data/fashion-mnist/`: the first [`TRAIN_IMAGES`] and [`TEST_IMAGES`] of Fashion-MNIST, IDX.
//! - `specs/`: two small specs that use every layer kind, for the conformance step.
//! - `run.sh` (`xtask/gpu-bundle/run.sh`): the checks, within 8 minutes, results under `$OUT`.
//!
//! candle-core 0.11.1 asks cudarc to link the CUDA libraries at build time
//! (`dynamic-linking`), which would make the binary need them to start at all, and cuBLAS to be
//! carried (hundreds of MiB). The bundle's build patches a copy of candle-core to ask for
//! cudarc's `dynamic-loading` instead (the only change, [`candle_core_loading_cuda`]), through
//! cargo's `--config patch`, leaving the workspace and its lock file as they were.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::shared_build::search_path;
use crate::{cache_home, cargo, root, run};

/// The most the bundle may weigh: the GPU machine takes 64 MiB of extra files in all.
pub const SIZE_LIMIT: u64 = 60 << 20;

/// The CUDA compiler and headers, pinned: CUDA 13.0, which driver 580 (the GPU machines') runs;
/// PTX from a newer nvcc would need a newer driver.
const TOOLKIT: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
];

/// cudarc's name for CUDA 13.0 (`CUDARC_CUDA_VERSION`).
const CUDA_VERSION: &str = "13000";

/// The GPUs the bundle is built for: H100 and H200 are both compute capability 9.0.
const COMPUTE_CAP: &str = "90";

/// The bundle's engines.
const FEATURES: &str = "candle-cuda,burn-cuda,burn-flex";

/// Fashion-MNIST images the bundle carries, per split.
const TRAIN_IMAGES: usize = 30_000;
const TEST_IMAGES: usize = 5_000;

/// Fashion-MNIST's four IDX files and how many records of each the bundle keeps.
const DATA_FILES: [(&str, usize); 4] = [
    ("train-images-idx3-ubyte.gz", TRAIN_IMAGES),
    ("train-labels-idx1-ubyte.gz", TRAIN_IMAGES),
    ("t10k-images-idx3-ubyte.gz", TEST_IMAGES),
    ("t10k-labels-idx1-ubyte.gz", TEST_IMAGES),
];

/// The conformance step's specs (`xtask/gpu-bundle/<name>`).
const SPECS: [&str; 2] = ["every-layer.json", "global-pooling.json"];

/// The script the GPU machine runs.
const SCRIPT: &str = include_str!("../gpu-bundle/run.sh");

/// Every file of a complete bundle, relative to its folder.
fn required_files() -> Vec<PathBuf> {
    let mut files = vec![
        PathBuf::from("run.sh"),
        PathBuf::from("bin/convkit.xz"),
        PathBuf::from("lib/libcudart.so.13"),
        PathBuf::from("cuda-include.tar.xz"),
    ];
    files.extend(SPECS.iter().map(|s| Path::new("specs").join(s)));
    files.extend(
        DATA_FILES
            .iter()
            .map(|(f, _)| Path::new("data/fashion-mnist").join(f)),
    );
    files
}

/// `cargo xtask gpu-bundle [--out DIR]`: builds the bundle into DIR (default
/// `target/gpu-bundle` in the checkout, which the device tool can carry), checks it, and runs
/// its script here, where the CUDA steps report themselves skipped.
pub fn gpu_bundle(args: &[String]) -> Result<()> {
    let out = match args {
        [] => root().join("target/gpu-bundle"),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask gpu-bundle [--out DIR]"),
    };
    let cache = cache_home()
        .context("HOME is not set: the CUDA toolkit is installed into ~/.cache/convkit")?
        .join("convkit");
    let toolkit = toolkit(&cache)?;
    let candle_core = candle_core_loading_cuda(&cache)?;
    let binary = build(&toolkit, &candle_core)?;
    assemble(&out, &binary, &toolkit)?;
    let files = check_bundle(&out)?;
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    for (file, size) in &files {
        eprintln!("xtask: {:>10} {}", size, file.display());
    }
    eprintln!(
        "xtask: the bundle in {} weighs {:.1} MiB of the {} MiB allowed",
        out.display(),
        total as f64 / (1 << 20) as f64,
        SIZE_LIMIT >> 20
    );
    let here = out.with_file_name(format!(
        "{}-run-here",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("bundle")
    ));
    eprintln!(
        "xtask: running its script here (no GPU: the CUDA steps are skipped), results in {}",
        here.display()
    );
    run(Command::new("bash")
        .arg(out.join("run.sh"))
        .env("OUT", &here)
        .env("LIMIT", "2000"))
}

/// The CUDA compiler, headers and runtime of [`TOOLKIT`], installed once from the Python
/// registry into the cache with the project's `.venv` pip; returns the toolkit's root (`nvidia/cu13`, with `bin/nvcc`).
fn toolkit(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("cuda-13.0");
    let root = dir.join("nvidia/cu13");
    let stamp = dir.join("installed.txt");
    let wanted = TOOLKIT.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let partial = cache.join("cuda-13.0.partial");
        let _ = std::fs::remove_dir_all(&partial);
        run(Command::new(crate::ensure_venv()?)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "--target",
            ])
            .arg(&partial)
            .args(TOOLKIT))?;
        // The linker wants the runtime under its plain name; the wheel has only the SONAME.
        std::os::unix::fs::symlink(
            "libcudart.so.13",
            partial.join("nvidia/cu13/lib/libcudart.so"),
        )
        .context("linking libcudart.so")?;
        std::fs::write(partial.join("installed.txt"), &wanted)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&partial, &dir)
            .with_context(|| format!("moving the toolkit to {}", dir.display()))?;
    }
    ensure!(
        root.join("bin/nvcc").is_file(),
        "{} has no bin/nvcc",
        root.display()
    );
    Ok(root)
}

/// A copy of candle-core (as the lock file pins it) whose cudarc dependency loads the CUDA
/// libraries at run time instead of linking them: `dynamic-linking` becomes `dynamic-loading`
/// in its manifest, nothing else changes. Returns the copy's folder.
fn candle_core_loading_cuda(cache: &Path) -> Result<PathBuf> {
    let metadata = cargo(&["metadata", "--format-version", "1", "--features", FEATURES])
        .output()
        .context("running cargo metadata")?;
    ensure!(
        metadata.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "candle-core" && p["source"].is_string())
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata lists no candle-core from crates.io")?;
    let source = Path::new(manifest)
        .parent()
        .expect("a manifest is in a folder");
    let copy = cache.join("gpu-bundle-src").join(
        source
            .file_name()
            .context("candle-core's folder has no name")?,
    );
    // Kept between runs (a fresh copy's times would make cargo compile candle again); the
    // stamp, written last, says the copy is complete.
    let stamp = copy.join(".convkit-patched");
    if !stamp.is_file() {
        let _ = std::fs::remove_dir_all(&copy);
        copy_dir(source, &copy)?;
        let manifest = copy.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest)?;
        std::fs::write(&manifest, loading_instead_of_linking(&text)?)?;
        std::fs::write(&stamp, "dynamic-linking -> dynamic-loading\n")?;
    }
    Ok(copy)
}

/// candle-core's manifest with cudarc's `"dynamic-linking"` feature replaced by
/// `"dynamic-loading"`; an error unless it appears exactly once.
fn loading_instead_of_linking(manifest: &str) -> Result<String> {
    let feature = "\"dynamic-linking\"";
    ensure!(
        manifest.matches(feature).count() == 1,
        "candle-core's manifest names {feature} {} times, not once: the bundle's patch does not fit this candle-core",
        manifest.matches(feature).count()
    );
    Ok(manifest.replace(feature, "\"dynamic-loading\""))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// The release build of `convkit` with the bundle's engines, in the shared target dir; the
/// lock file is put back as it was (the patch changes candle-core's source in it).
///
/// burn-cuda's CubeCL always links its LLVM compiler, and that LLVM comes only as a download
/// from GitHub (crate `tracel-llvm-bundler`), which no package registry carries. The bundle's
/// burn-cuda runs CubeCL's NVRTC compiler instead (convkit-burn asks for cubecl-cuda's `cpp`),
/// so the build skips the download (`DOCS_RS=1`, the bundler's own switch), and the link, which
/// then lacks LLVM's functions, gets [`llvm_stubs`] in their place: each stops the program with
/// a message naming it, should anything ever call it.
fn build(toolkit: &Path, candle_core: &Path) -> Result<PathBuf> {
    let lock = root().join("Cargo.lock");
    let locked = std::fs::read(&lock).context("reading Cargo.lock")?;
    let built = (|| {
        let missing = link(toolkit, candle_core, None)?;
        if !missing.is_empty() {
            let stubs = llvm_stubs(&missing)?;
            eprintln!(
                "xtask: linking again with stubs for the {} LLVM functions CubeCL's unused LLVM compiler names",
                missing.len()
            );
            let still = link(toolkit, candle_core, Some(&stubs))?;
            ensure!(
                still.is_empty(),
                "the link still lacks {} symbols with the stubs: {}",
                still.len(),
                still.join(", ")
            );
        }
        Ok(())
    })();
    std::fs::write(&lock, locked).context("putting Cargo.lock back")?;
    built?;
    Ok(crate::target_dir().join("release/convkit"))
}

/// One `cargo rustc` of the bundle's `convkit`, with `stubs` (an object file) linked in when
/// given. Returns the symbols the link lacked (none when it succeeded); an error when the
/// build failed otherwise, or the link lacked a symbol that is neither LLVM's nor one of
/// cubecl-llvm's C++ shims.
fn link(toolkit: &Path, candle_core: &Path, stubs: Option<&Path>) -> Result<Vec<String>> {
    let patch = format!(
        "patch.crates-io.candle-core.path={}",
        serde_json::Value::from(candle_core.to_str().context("a UTF-8 cache path")?)
    );
    let mut c = cargo(&[
        "rustc",
        "--release",
        "--no-default-features",
        "--features",
        FEATURES,
        "--bin",
        "convkit",
        "--config",
        &patch,
        "--",
        "-Clink-arg=-Wl,--error-limit=0",
    ]);
    if let Some(stubs) = stubs {
        c.arg(format!("-Clink-arg={}", stubs.display()));
    }
    c.env("PATH", search_path("PATH", vec![toolkit.join("bin")])?)
        .env("NVCC", toolkit.join("bin/nvcc"))
        .env("CUDA_HOME", toolkit)
        .env("CUDARC_CUDA_VERSION", CUDA_VERSION)
        .env("CUDA_COMPUTE_CAP", COMPUTE_CAP)
        // candle's kernels link libcudart, and the C compiler finds it here.
        .env("LIBRARY_PATH", toolkit.join("lib"))
        // tracel-llvm-bundler's and cubecl-llvm's switch: no LLVM download, no LLVM shims.
        .env("DOCS_RS", "1")
        .stderr(std::process::Stdio::piped());
    eprintln!("xtask: running {c:?}");
    let mut child = c.spawn().with_context(|| format!("starting {c:?}"))?;
    let stderr = child.stderr.take().expect("piped");
    let mut missing = std::collections::BTreeSet::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line?;
        match undefined_symbol(&line) {
            Some(name) => {
                missing.insert(name.to_string());
            }
            // The linker's many lines on where each symbol was wanted are left out.
            None if line.trim_start().starts_with(">>>") => {}
            None => eprintln!("{line}"),
        }
    }
    let status = child.wait()?;
    if status.success() {
        return Ok(Vec::new());
    }
    ensure!(!missing.is_empty(), "{c:?} failed with {status}");
    let foreign: Vec<&String> = missing
        .iter()
        .filter(|name| !(name.starts_with("LLVM") || name.starts_with("cubecl_")))
        .collect();
    ensure!(
        foreign.is_empty(),
        "the link lacks symbols that are not LLVM's: {foreign:?}"
    );
    Ok(missing.into_iter().collect())
}

/// The symbol a linker's line says is undefined (lld and mold: `undefined symbol: NAME`; GNU
/// ld: ``undefined reference to `NAME'``).
fn undefined_symbol(line: &str) -> Option<&str> {
    if let Some((_, name)) = line.split_once("undefined symbol: ") {
        return Some(name.trim());
    }
    let (_, rest) = line.split_once("undefined reference to `")?;
    rest.split_once('\'').map(|(name, _)| name)
}

/// An object file that defines each of `names` as a function which prints that it was called
/// in a build without LLVM and aborts; compiled with the C compiler into the target dir.
fn llvm_stubs(names: &[String]) -> Result<PathBuf> {
    let dir = crate::target_dir().join("gpu-bundle-build");
    std::fs::create_dir_all(&dir)?;
    let source = dir.join("llvm-stubs.c");
    let object = dir.join("llvm-stubs.o");
    std::fs::write(&source, llvm_stubs_source(names)?)?;
    run(Command::new("cc")
        .args(["-c", "-O2", "-fPIC", "-o"])
        .arg(&object)
        .arg(&source))?;
    Ok(object)
}

/// The C source of [`llvm_stubs`]; an error for a name that is not a C identifier.
fn llvm_stubs_source(names: &[String]) -> Result<String> {
    let mut c = String::from(
        "// Made by `cargo xtask gpu-bundle`: LLVM's functions, which the bundle's burn-cuda\n\
         // (CubeCL with its NVRTC compiler) names but never calls.\n\
         #include <stdio.h>\n#include <stdlib.h>\n\n\
         static void called(const char *name) {\n    \
         fprintf(stderr, \"convkit: %s was called, but this build has no LLVM: its burn-cuda \
         compiles kernels with NVRTC (CubeCL's cpp compiler)\\n\", name);\n    \
         abort();\n}\n\n",
    );
    for name in names {
        ensure!(
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "`{name}` is not a C identifier"
        );
        c.push_str(&format!("void {name}(void) {{ called(\"{name}\"); }}\n"));
    }
    Ok(c)
}

/// Writes the bundle's files into `out`, replacing what was there.
fn assemble(out: &Path, binary: &Path, toolkit: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(out);
    for dir in ["bin", "lib", "specs", "data/fashion-mnist"] {
        std::fs::create_dir_all(out.join(dir))?;
    }
    let stripped = crate::target_dir().join("gpu-bundle-build/convkit");
    run(Command::new("strip").arg("-o").arg(&stripped).arg(binary))?;
    let packed = std::fs::File::create(out.join("bin/convkit.xz"))?;
    run(Command::new("xz")
        .args(["-9", "--threads=0", "--stdout"])
        .arg(&stripped)
        .stdout(packed))?;
    std::fs::copy(
        toolkit.join("lib/libcudart.so.13"),
        out.join("lib/libcudart.so.13"),
    )?;
    run(Command::new("tar")
        .arg("--create")
        .arg("--xz")
        .arg("--file")
        .arg(out.join("cuda-include.tar.xz"))
        .arg("--directory")
        .arg(toolkit)
        .arg("include"))?;
    for spec in SPECS {
        std::fs::copy(
            root().join("xtask/gpu-bundle").join(spec),
            out.join("specs").join(spec),
        )?;
    }
    std::fs::write(out.join("run.sh"), SCRIPT)?;
    let source = fashion_mnist()?;
    for (file, records) in DATA_FILES {
        let kept = idx_head(
            &source.join(file),
            &out.join("data/fashion-mnist").join(file),
            records,
        )?;
        ensure!(
            kept == records,
            "{} has only {kept} records, the bundle wants {records}",
            source.join(file).display()
        );
    }
    Ok(())
}

/// Fashion-MNIST's folder: `$CONVKIT_DATA/fashion-mnist`, else Debian's, installed if needed.
fn fashion_mnist() -> Result<PathBuf> {
    let given = crate::data_dir().map(|d| d.join("fashion-mnist"));
    let debian = PathBuf::from("/usr/share/datasets/fashion-mnist");
    let has_all = |dir: &Path| DATA_FILES.iter().all(|(f, _)| dir.join(f).is_file());
    if let Some(dir) = given.filter(|d| has_all(d)) {
        return Ok(dir);
    }
    if !has_all(&debian) {
        crate::setup(crate::Needs {
            torch: false,
            vulkan: false,
            fashion_mnist: true,
            mpi: false,
        })?;
    }
    ensure!(has_all(&debian), "no Fashion-MNIST in {}", debian.display());
    Ok(debian)
}

/// Writes to `to` the first `records` records of the gzipped IDX file `from` (all of them if
/// it has fewer), gzipped; returns how many it wrote.
fn idx_head(from: &Path, to: &Path, records: usize) -> Result<usize> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?,
    )
    .read_to_end(&mut bytes)
    .with_context(|| format!("reading {}", from.display()))?;
    let (head, kept) = idx_prefix(&bytes, records)
        .with_context(|| format!("{} is not an IDX file of bytes", from.display()))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&head)?;
    std::fs::write(to, gz.finish()?).with_context(|| format!("writing {}", to.display()))?;
    Ok(kept)
}

/// The IDX file `bytes` cut to its first `records` records (unsigned bytes, any number of
/// dimensions): the header with the new count, then those records; and that count.
fn idx_prefix(bytes: &[u8], records: usize) -> Result<(Vec<u8>, usize)> {
    ensure!(
        bytes.len() >= 4,
        "{} bytes: shorter than a header",
        bytes.len()
    );
    ensure!(
        bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08,
        "magic {:02x?}, not 00 00 08 (unsigned bytes)",
        &bytes[..3]
    );
    let dims = bytes[3] as usize;
    let header = 4 + 4 * dims;
    ensure!(
        dims >= 1 && bytes.len() >= header,
        "a header of {dims} dimensions is cut short"
    );
    let dim = |i: usize| {
        u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
    };
    let record: usize = (1..dims).map(dim).product();
    let kept = dim(0).min(records);
    let end = header + kept * record;
    ensure!(
        bytes.len() >= end,
        "{} bytes, but {kept} records of {record} bytes need {end}",
        bytes.len()
    );
    let mut head = bytes[..end].to_vec();
    head[4..8].copy_from_slice(&(kept as u32).to_be_bytes());
    Ok((head, kept))
}

/// Checks an assembled bundle: every [`required_files`] entry is there, the script parses
/// (`bash -n`), and the whole folder weighs at most [`SIZE_LIMIT`]. Returns its files and
/// their sizes.
fn check_bundle(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let missing: Vec<String> = required_files()
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| f.display().to_string())
        .collect();
    ensure!(
        missing.is_empty(),
        "the bundle in {} lacks {}",
        dir.display(),
        missing.join(", ")
    );
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(dir.join("run.sh"))
        .output()
        .context("running bash -n")?;
    ensure!(
        syntax.status.success(),
        "{}/run.sh does not parse: {}",
        dir.display(),
        String::from_utf8_lossy(&syntax.stderr)
    );
    let mut files = Vec::new();
    list_files(dir, dir, &mut files)?;
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    ensure!(
        total <= SIZE_LIMIT,
        "the bundle in {} weighs {total} bytes, over the {SIZE_LIMIT} allowed",
        dir.display()
    );
    Ok(files)
}

fn list_files(base: &Path, dir: &Path, files: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            list_files(base, &entry.path(), files)?;
        } else {
            let relative = entry.path().strip_prefix(base)?.to_path_buf();
            files.push((relative, meta.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-gpu-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A bundle of the right files, each a few bytes, the script the real one.
    fn small_bundle(name: &str) -> PathBuf {
        let dir = scratch(name);
        for file in required_files() {
            let path = dir.join(&file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let contents = if file == Path::new("run.sh") {
                SCRIPT
            } else {
                "x"
            };
            std::fs::write(path, contents).unwrap();
        }
        dir
    }

    #[test]
    fn a_complete_bundle_passes_and_lists_every_file() {
        let dir = small_bundle("complete");
        let files = check_bundle(&dir).unwrap();
        let names: Vec<PathBuf> = files.into_iter().map(|(f, _)| f).collect();
        for file in required_files() {
            assert!(names.contains(&file), "{} not listed", file.display());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bundle_missing_a_file_over_the_limit_or_with_a_broken_script_is_refused() {
        let dir = small_bundle("bad");
        std::fs::remove_file(dir.join("lib/libcudart.so.13")).unwrap();
        let e = check_bundle(&dir).unwrap_err().to_string();
        assert!(e.contains("lacks lib/libcudart.so.13"), "{e}");

        std::fs::write(dir.join("lib/libcudart.so.13"), "x").unwrap();
        std::fs::write(dir.join("run.sh"), "if then\n").unwrap();
        let e = check_bundle(&dir).unwrap_err().to_string();
        assert!(e.contains("run.sh does not parse"), "{e}");

        std::fs::write(dir.join("run.sh"), SCRIPT).unwrap();
        let big = std::fs::File::create(dir.join("bin/convkit.xz")).unwrap();
        big.set_len(SIZE_LIMIT).unwrap(); // sparse: the limit exactly, plus the other files
        let e = check_bundle(&dir).unwrap_err().to_string();
        assert!(e.contains("over the 62914560 allowed"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_bundle_file_the_script_names_is_in_the_bundle() {
        let required = required_files();
        let named: Vec<&str> = SCRIPT
            .split("$here/")
            .skip(1)
            .map(|rest| {
                rest.split(['"', '}'])
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
            })
            // `out` is where the results go, which the run makes.
            .filter(|path| *path != "out")
            .collect();
        assert!(named.contains(&"bin/convkit.xz"), "{named:?}");
        for path in named {
            let expanded: Vec<PathBuf> = if path.contains("$spec") {
                ["every-layer", "global-pooling"]
                    .iter()
                    .map(|s| PathBuf::from(path.replace("$spec", s)))
                    .collect()
            } else {
                vec![PathBuf::from(path)]
            };
            for p in expanded {
                let in_bundle = required.iter().any(|r| r.starts_with(&p));
                assert!(
                    in_bundle,
                    "run.sh names $here/{} which the bundle lacks",
                    p.display()
                );
            }
        }
        for spec in SPECS {
            assert!(
                SCRIPT.contains(spec.trim_end_matches(".json")),
                "{spec} unused"
            );
        }
    }

    #[test]
    fn the_steps_time_limits_add_up_to_at_most_eight_minutes() {
        let mut total = 20; // nvidia-smi's own limit
        for line in SCRIPT.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("step ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap();
            let limit: u32 = words.next().unwrap().parse().unwrap();
            // Each step may overrun its limit by timeout's 10 s grace; the conformance step
            // runs once per spec.
            let runs = if name.contains("$spec") {
                SPECS.len() as u32
            } else {
                1
            };
            total += runs * (limit + 10);
        }
        assert!(total > 300, "{total}: steps not found");
        assert!(
            total <= 8 * 60,
            "the steps may take {total} s, over 8 minutes"
        );
    }

    /// A bundle whose `convkit` is a shell script that answers `backends` with `backends`
    /// and logs each `compare` it is asked for, exiting with `compare_exit`.
    fn bundle_with_fake_convkit(name: &str, backends: &str, compare_exit: u8) -> PathBuf {
        let dir = small_bundle(name);
        let fake = dir.join("fake-convkit");
        let script = format!(
            "#!/bin/sh\n\
             case \"$1\" in\n\
             --version) echo 'convkit 0.1.0 (fake)' ;;\n\
             backends) printf '%s' '{backends}' ;;\n\
             compare) echo \"$*\" >>'{log}'; exit {compare_exit} ;;\n\
             esac\n",
            log = dir.join("compares.log").display()
        );
        std::fs::write(&fake, script).unwrap();
        let packed = std::fs::File::create(dir.join("bin/convkit.xz")).unwrap();
        let status = Command::new("xz")
            .args(["--stdout"])
            .arg(&fake)
            .stdout(packed)
            .status()
            .unwrap();
        assert!(status.success());
        let headers = dir.join("include");
        std::fs::create_dir_all(&headers).unwrap();
        std::fs::write(headers.join("cuda_runtime.h"), "").unwrap();
        let status = Command::new("tar")
            .arg("--create")
            .arg("--xz")
            .arg("--file")
            .arg(dir.join("cuda-include.tar.xz"))
            .arg("--directory")
            .arg(&dir)
            .arg("include")
            .status()
            .unwrap();
        assert!(status.success());
        dir
    }

    /// Runs the bundle's script; its exit code, `summary.md` and the compares it asked for.
    fn run_script(dir: &Path) -> (i32, String, String) {
        let out = dir.join("out");
        let status = Command::new("bash")
            .arg(dir.join("run.sh"))
            .env("OUT", &out)
            .env_remove("CUDA_PATH")
            .output()
            .unwrap();
        let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
        let compares = std::fs::read_to_string(dir.join("compares.log")).unwrap_or_default();
        (status.status.code().unwrap(), summary, compares)
    }

    #[test]
    fn on_a_gpu_the_script_checks_each_cuda_engine_that_started_and_compares_them_all() {
        let backends = "candle-cpu     CPU, 16 threads\n\
                        candle-cuda    NVIDIA H200 (CUDA device 0)\n\
                        burn-flex      CPU, 16 threads (burn Flex)\n\
                        burn-cuda      unavailable: burn-cuda: the device could not start: no\n";
        let dir = bundle_with_fake_convkit("gpu", backends, 0);
        let (code, summary, compares) = run_script(&dir);
        assert_eq!(code, 0, "{summary}");
        assert!(summary.contains("- burn-cuda: skipped, its device did not start: burn-cuda: the device could not start: no"), "{summary}");
        let runs: Vec<&str> = compares.lines().collect();
        assert_eq!(runs.len(), 3, "{compares}");
        for (run, spec) in runs.iter().zip(["every-layer", "global-pooling"]) {
            assert!(
                run.starts_with("compare --backends candle-cpu,candle-cuda --model "),
                "{run}"
            );
            assert!(
                run.contains(&format!("specs/{spec}.json --limit 1024")),
                "{run}"
            );
        }
        assert!(
            runs[2].starts_with("compare --backends candle-cpu,burn-flex,candle-cuda --model tutorial-mnist --limit 30000 --epochs 1"),
            "{}",
            runs[2]
        );
        for step in [
            "conformance-every-layer: PASS",
            "conformance-global-pooling: PASS",
            "compare: PASS",
        ] {
            assert!(summary.contains(step), "{step} not in {summary}");
        }
        assert!(summary.contains("every step that ran passed"), "{summary}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_agreement_check_or_an_engine_missing_from_the_build_fails_the_run() {
        let backends = "candle-cpu     CPU, 16 threads\n\
                        candle-cuda    NVIDIA H200 (CUDA device 0)\n\
                        burn-flex      CPU, 16 threads (burn Flex)\n";
        let dir = bundle_with_fake_convkit("fail", backends, 3);
        let (code, summary, compares) = run_script(&dir);
        assert_eq!(code, 1, "{summary}");
        assert!(
            summary.contains("- burn-cuda: not built into this bundle"),
            "{summary}"
        );
        assert!(
            summary.contains("compare: FAIL (an agreement check failed)"),
            "{summary}"
        );
        assert!(summary.contains("a step failed"), "{summary}");
        assert_eq!(
            compares.lines().count(),
            3,
            "every step still ran: {compares}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_script_parses() {
        let dir = scratch("script");
        std::fs::write(dir.join("run.sh"), SCRIPT).unwrap();
        let status = Command::new("bash")
            .arg("-n")
            .arg(dir.join("run.sh"))
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_idx_prefix_keeps_the_header_and_the_first_records() {
        let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2];
        idx.extend(1..=12u8);
        let (head, kept) = idx_prefix(&idx, 2).unwrap();
        assert_eq!(kept, 2);
        assert_eq!(&head[4..8], &[0, 0, 0, 2]);
        assert_eq!(&head[16..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (all, kept) = idx_prefix(&idx, 10).unwrap();
        assert_eq!((all, kept), (idx.clone(), 3));

        let labels = [0, 0, 8, 1, 0, 0, 0, 4, 9, 8, 7, 6];
        assert_eq!(
            idx_prefix(&labels, 1).unwrap().0,
            vec![0, 0, 8, 1, 0, 0, 0, 1, 9]
        );

        let e = idx_prefix(&idx[..20], 3).unwrap_err().to_string();
        assert!(e.contains("need 28"), "{e}");
        let e = idx_prefix(&[0, 0, 0x0d, 1], 1).unwrap_err().to_string();
        assert!(e.contains("not 00 00 08"), "{e}");
    }

    #[test]
    fn undefined_symbols_are_read_from_lld_mold_and_gnu_ld() {
        assert_eq!(
            undefined_symbol("rust-lld: error: undefined symbol: LLVMSetLinkage"),
            Some("LLVMSetLinkage")
        );
        assert_eq!(
            undefined_symbol("core.rs:707: undefined reference to `cubecl_free_message'"),
            Some("cubecl_free_message")
        );
        assert_eq!(undefined_symbol("   Compiling convkit v0.1.0"), None);
    }

    #[test]
    fn llvm_stubs_compile_and_refuse_names_that_are_not_identifiers() {
        let names = vec![
            "LLVMSetLinkage".to_string(),
            "cubecl_free_message".to_string(),
        ];
        let source = llvm_stubs_source(&names).unwrap();
        assert!(source.contains("void LLVMSetLinkage(void) { called(\"LLVMSetLinkage\"); }"));
        let dir = scratch("stubs");
        std::fs::write(dir.join("s.c"), &source).unwrap();
        let status = Command::new("cc")
            .args(["-c", "-Wall", "-Werror", "-o"])
            .arg(dir.join("s.o"))
            .arg(dir.join("s.c"))
            .status()
            .unwrap();
        assert!(status.success(), "{source}");
        std::fs::remove_dir_all(dir).unwrap();
        let e = llvm_stubs_source(&["a;b".into()]).unwrap_err().to_string();
        assert!(e.contains("not a C identifier"), "{e}");
    }

    #[test]
    fn the_candle_core_patch_swaps_exactly_the_linking_feature() {
        let manifest =
            "[dependencies.cudarc]\nfeatures = [\n    \"driver\",\n    \"dynamic-linking\",\n]\n";
        let patched = loading_instead_of_linking(manifest).unwrap();
        assert_eq!(
            patched,
            manifest.replace("dynamic-linking", "dynamic-loading")
        );
        let e = loading_instead_of_linking("[dependencies]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 times"), "{e}");
    }
}
