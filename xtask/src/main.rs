//! `cargo xtask <command>`: the project's own automation.
//!
//! - `setup`: install what the tests and tutorials need: Debian's dataset-fashion-mnist and
//!   mesa-vulkan-drivers (lavapipe, for burn-wgpu without a GPU), and torch==2.9.0 from PyPI
//!   into `.venv` for the tch engine (unless LIBTORCH is set), with safetensors, onnx and
//!   onnxruntime for the interop tests.
//! - `test`: setup, the test build, each engine feature that builds here built alone, then
//!   every test of the workspace and every notebook on a small subset (what CI runs).
//! - `notebooks`: setup, then run the evcxr notebooks: on the CI subset, or with `--full` as
//!   written, saving their outputs (`cargo xtask notebooks --full [NAME...]`).
//! - `tutorial`: setup, then train `tutorial-mnist` on MNIST in release mode (extra args go to
//!   `convkit train`).
//! - `compare`: setup, then `convkit compare` in release mode with every engine that builds
//!   here: the same model, weights and batches on each; agreement and speed.
//! - `bench`: criterion benches: one training step and one inference batch per engine.
//! - `scaling`: data-parallel throughput under `mpirun`, one rank against several.
//! - `fuzz`: the parsers' fuzz loop in a release build.
//! - `gpu-bundle`: candle-cuda and burn-cuda built into one folder a GPU machine can run.
//! - `check-cuda`: burn-cuda type-checked alone, without the GPU bundle's toolkit.
//! - `pins`: print what the feature pins of the single-feature builds lack (xtask/check-pins).
//!
//! Builds go to `$CONVKIT_TARGET_DIR` (default `~/.cache/convkit/target`), outside the
//! checkout, so fresh clones on the same machine reuse them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

#[cfg(test)]
mod cycles;
#[cfg(test)]
mod figures;
mod gpu_bundle;
mod notebooks;
mod pins;
mod scaling;
mod shared_build;
mod steps;

use steps::Steps;

fn main() -> Result<()> {
    forget_cargo_run_env();
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match command.as_str() {
        "setup" => setup(Needs::EVERYTHING),
        "test" => {
            let mut steps = Steps::new();
            let result = test(&rest, &mut steps);
            eprint!("{}", steps.table());
            result
        }
        "notebooks" => {
            let mut steps = Steps::new();
            let full = rest.iter().any(|a| a == "--full");
            let only: Vec<String> = rest.iter().filter(|a| *a != "--full").cloned().collect();
            let result = steps
                .time("setup", || setup(Needs::EVERYTHING))
                .and_then(|()| notebooks::run_notebooks(full, &only, None, &mut steps));
            eprint!("{}", steps.table());
            result.map(drop)
        }
        "tutorial" => {
            // The tutorial trains on MNIST with the default engine (candle): nothing to install.
            tutorial(&rest)
        }
        "compare" => {
            setup(Needs::EVERYTHING)?;
            compare(&rest)
        }
        "bench" => {
            setup(Needs {
                fashion_mnist: false,
                ..Needs::EVERYTHING
            })?;
            bench(&rest)
        }
        "scaling" => {
            setup(Needs {
                vulkan: false,
                ..Needs::EVERYTHING
            })?;
            scaling::scaling(&rest)
        }
        "fuzz" => fuzz(&rest),
        "gpu-bundle" => gpu_bundle::gpu_bundle(&rest),
        "check-cuda" => check_cuda(),
        "pins" => {
            let missing = pins::missing()?;
            if missing.is_empty() {
                eprintln!("xtask: the pins in xtask/check-pins/Cargo.toml are complete");
            } else {
                print!("{}", pins::manifest_lines(&missing));
            }
            Ok(())
        }
        _ => {
            eprintln!("usage: cargo xtask <compare | setup | test | notebooks | tutorial | bench | scaling | fuzz | gpu-bundle | check-cuda | pins> [args]\n\n  compare   setup, then cross-check and benchmark every engine (args go to `convkit compare`)\n  setup     install what the tests need (dataset-fashion-mnist, mesa-vulkan-drivers, torch wheel)\n  test      setup, then run every test of the workspace and the notebooks on a subset\n  notebooks setup, then run the notebooks (--full: as written, saving outputs; NAME: only those)\n  tutorial  train tutorial-mnist on MNIST with candle, installing nothing (args go to `convkit train`)\n  bench     criterion benches per compiled engine (args go to criterion)\n  scaling   data-parallel throughput, 1 MPI rank against N, convkit's default threads [--backends a,b] [--ranks N] [--limit IMAGES] [--batch-size B] [--repeat R]\n  fuzz      the parsers' fuzz loop in a release build: [SECONDS per target, default 600] [SEED]\n  gpu-bundle  build candle-cuda and burn-cuda here into one folder a GPU machine can run (target/gpu-bundle; --out DIR), and run its checks here\n  check-cuda  type-check burn-cuda alone (which `test` leaves to the GPU bundle)\n  pins      print the lines xtask/check-pins/Cargo.toml lacks, if any (the single-feature builds' pins)");
            if command.is_empty() || command == "help" || command == "--help" {
                Ok(())
            } else {
                bail!("unknown xtask command `{command}`")
            }
        }
    }
}

/// Drops the variables `cargo run` set for xtask itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`,
/// …), so that the cargo and evcxr runs xtask starts do not inherit them. Some build scripts
/// (ring's) watch these names: inherited, their values (xtask's folder, which differs in every
/// clone) would rerun those scripts and rebuild everything above them on each change.
fn forget_cargo_run_env() {
    let injected: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str().is_some_and(|n| {
                n.starts_with("CARGO_PKG_")
                    || n.starts_with("CARGO_MANIFEST_")
                    || matches!(
                        n,
                        "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
                    )
            })
        })
        .collect();
    for name in injected {
        // Single-threaded here: nothing else reads the environment yet.
        std::env::remove_var(name);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CONVKIT_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/convkit/target")))
        .unwrap_or_else(|| root().join("target"))
}

/// `$CONVKIT_DATA`, else the `shared/datasets` folder beside the checkout when present, else
/// the cache `cargo xtask test` downloaded the datasets into ([`TestData`]).
fn data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CONVKIT_DATA") {
        return Some(d.into());
    }
    let shared = root().join("../shared/datasets");
    if shared.is_dir() {
        return Some(shared.canonicalize().unwrap_or(shared));
    }
    DOWNLOADED.get().cloned()
}

/// Where `cargo xtask test` downloaded the datasets, on a machine without a shared copy.
static DOWNLOADED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The datasets the tests and notebooks read.
#[derive(Debug, PartialEq)]
enum TestData {
    /// `CONVKIT_DATA` or the shared copy beside the checkout, read offline.
    Given(PathBuf),
    /// Neither is there: convkit's own checksummed downloader fetches MNIST and CIFAR-10 into
    /// convkit's cache (`~/.cache/convkit`), which the tests then read offline. Fashion-MNIST
    /// comes from Debian's package, which setup installs.
    Download { into: PathBuf },
}

impl TestData {
    /// The datasets named: by `found` ([`data_dir`]), else into the cache under `cache_home`
    /// (`$XDG_CACHE_HOME`, else `~/.cache`: where convkit's downloader puts them).
    fn choose(found: Option<PathBuf>, cache_home: Option<PathBuf>) -> Result<Self> {
        match (found, cache_home) {
            (Some(dir), _) => Ok(TestData::Given(dir)),
            (None, Some(cache)) => Ok(TestData::Download {
                into: cache.join("convkit"),
            }),
            (None, None) => bail!("no datasets: set CONVKIT_DATA to a folder holding mnist/ and cifar10/, or HOME so that they can be downloaded into ~/.cache/convkit"),
        }
    }
}

/// `$XDG_CACHE_HOME`, else `~/.cache`, as convkit's `dirs::cache_dir()` finds it on Linux.
fn cache_home() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
}

/// Writes `contents` to a temporary file beside `path`, then renames it into place, so a
/// reader never sees half a file.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// `cargo xtask fuzz [SECONDS] [SEED]`: `crates/convkit-core/tests/fuzz.rs` for SECONDS per
/// parser (600 by default; `cargo xtask test` runs 3), in a release build, from SEED (by
/// default the time, so each run explores new inputs; it is printed to reproduce a run).
fn fuzz(args: &[String]) -> Result<()> {
    let seconds = args.first().map_or("600", String::as_str);
    seconds
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .with_context(|| format!("expected seconds per target, found `{seconds}`"))?;
    let seed = match args.get(1) {
        Some(seed) => seed
            .parse::<u64>()
            .with_context(|| format!("expected a seed (an integer), found `{seed}`"))?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    eprintln!("xtask: fuzzing every parser for {seconds} s from seed {seed}");
    let mut c = cargo(&[
        "test",
        "--release",
        "-p",
        "convkit-core",
        "--test",
        "fuzz",
        "--",
        "--nocapture",
    ]);
    c.env("CONVKIT_FUZZ_SECONDS", seconds)
        .env("CONVKIT_FUZZ_SEED", seed.to_string());
    run(&mut c)
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The step name for cargo's line announcing a test binary: `Running tests/cli.rs
/// (target/…/deps/cli-0f3a…)` gives `test cli (tests/cli.rs)`, `Doc-tests convkit_core` gives
/// `doc-tests convkit_core`; any other line gives `None`.
fn test_binary_name(line: &str) -> Option<String> {
    let line = line.trim();
    if let Some(krate) = line.strip_prefix("Doc-tests ") {
        return Some(format!("doc-tests {krate}"));
    }
    let running = line.strip_prefix("Running ")?;
    let (source, binary) = running.split_once(" (")?;
    let binary = Path::new(binary.trim_end_matches(')'))
        .file_name()?
        .to_str()?;
    let binary = binary.rsplit_once('-').map_or(binary, |(name, _hash)| name);
    let source = source.trim_start_matches("unittests ");
    Some(format!("test {binary} ({source})"))
}

/// Run `cargo test`, echoing its output, and add up its `test result:` lines. Each test
/// binary's time (from cargo's `Running …` / `Doc-tests …` line to the next) goes into `steps`.
fn run_counting_tests(cmd: &mut Command, steps: &mut Steps) -> Result<(usize, usize)> {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // cargo names each binary on stderr as it starts it; the binaries' results come on stdout.
    let started: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stderr = child.stderr.take().expect("piped");
    let names = Arc::clone(&started);
    let echo = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{line}");
            if let Some(name) = test_binary_name(&line) {
                names
                    .lock()
                    .expect("not poisoned")
                    .push((name, Instant::now()));
            }
        }
    });
    let (mut passed, mut failed) = (0, 0);
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';').find_map(|part| {
                    part.trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(word)?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
            };
            passed += count("passed").unwrap_or(0);
            failed += count("failed").unwrap_or(0);
        }
    }
    let status = child.wait()?;
    let _ = echo.join();
    let end = Instant::now();
    let started = started.lock().expect("not poisoned");
    for (i, (name, start)) in started.iter().enumerate() {
        let next = started.get(i + 1).map_or(end, |(_, t)| *t);
        steps.record(name, next - *start);
    }
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("{cmd:?} failed with {status}");
    }
    Ok((passed, failed))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A Debian package a command needs, and what it provides (for systems without apt).
pub(crate) struct DebianPackage {
    pub(crate) name: &'static str,
    pub(crate) provides: &'static str,
}

/// Install missing Debian packages (with sudo when not root). Without apt-get, lists what is
/// missing and what each provides, to install with the system's own package manager.
pub(crate) fn apt_install(packages: &[DebianPackage]) -> Result<()> {
    let missing: Vec<&DebianPackage> = packages
        .iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p.name])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !shared_build::on_path("apt-get") {
        let list: Vec<String> = missing
            .iter()
            .map(|p| format!("  {}: {}", p.name, p.provides))
            .collect();
        bail!(
            "this system has no apt-get to install these Debian packages; install what they provide with its own package manager, then run the command again:\n{}",
            list.join("\n")
        );
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let sudo = if is_root() { vec![] } else { vec!["sudo"] };
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.clone();
        all.push("apt-get");
        all.extend(args);
        let mut c = Command::new(all[0]);
        c.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    if run(apt(&["install", "-y", "--no-install-recommends"]).args(&names)).is_err() {
        run(&mut apt(&["update"]))?;
        run(apt(&["install", "-y", "--no-install-recommends"]).args(&names))?;
    }
    Ok(())
}

/// The PyTorch release tch 0.22 is built against; libtorch must match it exactly.
const TORCH_VERSION: &str = "2.9.0";
/// The Python packages besides torch, pinned: safetensors (with packaging and numpy, which its
/// torch module uses) for `python/convkit_torch.py` and the PyTorch interop tests; onnx and
/// onnxruntime for `python/convkit_onnx.py`, which checks and runs ONNX exports.
const PYTHON_PACKAGES: [(&str, &str); 5] = [
    ("safetensors", "0.6.2"),
    ("packaging", "25.0"),
    ("numpy", "2.3.5"),
    ("onnx", "1.23.2"),
    ("onnxruntime", "1.32.0"),
];

fn venv() -> PathBuf {
    root().join(".venv")
}

/// What a command needs installed besides the Rust toolchain.
#[derive(Clone, Copy, Debug)]
struct Needs {
    /// libtorch for the tch engine (the torch wheel in `.venv`, unless `LIBTORCH` is set).
    torch: bool,
    /// A Vulkan driver for burn-wgpu (Mesa's software one where the machine has no GPU).
    vulkan: bool,
    /// Fashion-MNIST (compare's and the tests' default dataset) from Debian.
    fashion_mnist: bool,
    /// Open MPI (library, headers and `mpirun`) and libclang (for rsmpi's bindgen), for the
    /// `mpi` feature.
    mpi: bool,
}

impl Needs {
    const EVERYTHING: Needs = Needs {
        torch: true,
        vulkan: true,
        fashion_mnist: true,
        mpi: true,
    };
}

fn setup(needs: Needs) -> Result<()> {
    let mut packages = Vec::new();
    if needs.fashion_mnist {
        // Installs /usr/share/datasets/fashion-mnist/.
        packages.push(DebianPackage {
            name: "dataset-fashion-mnist",
            provides: "the Fashion-MNIST IDX files (or put them in $CONVKIT_DATA/fashion-mnist/)",
        });
    }
    if needs.vulkan {
        // Mesa's software Vulkan driver (lavapipe) gives burn-wgpu a device without a GPU.
        packages.extend([
            DebianPackage {
                name: "mesa-vulkan-drivers",
                provides: "a Vulkan driver for burn-wgpu (Mesa's; any Vulkan driver will do)",
            },
            DebianPackage {
                name: "libvulkan1",
                provides: "the Vulkan loader (libvulkan.so.1)",
            },
        ]);
    }
    if needs.mpi {
        packages.extend([
            DebianPackage {
                name: "libopenmpi-dev",
                provides: "an MPI library with its headers and mpicc (Open MPI or MPICH)",
            },
            DebianPackage {
                name: "openmpi-bin",
                provides: "mpirun, to start the ranks of the MPI tests",
            },
            DebianPackage {
                name: "libclang-dev",
                provides: "libclang, which rsmpi's build runs bindgen with",
            },
        ]);
    }
    apt_install(&packages)?;
    if needs.torch {
        setup_libtorch()?;
    }
    Ok(())
}

/// libtorch for the tch engine: the user's `LIBTORCH` if set, else the torch wheel in a
/// project-local virtual environment (`.venv`), installed once.
fn setup_libtorch() -> Result<()> {
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        let dir = PathBuf::from(dir);
        let lib = dir.join("lib");
        if !lib.join("libtorch_cpu.so").exists() && !lib.join("libtorch_cpu.dylib").exists() {
            bail!("LIBTORCH={} has no lib/libtorch_cpu.so: point it at a libtorch {TORCH_VERSION} folder, or unset it to use the torch=={TORCH_VERSION} wheel", dir.display());
        }
        if let Ok(v) = std::fs::read_to_string(dir.join("build-version")) {
            if !v.trim().starts_with(TORCH_VERSION) {
                bail!(
                    "LIBTORCH={} is libtorch {}, but tch 0.22 needs {TORCH_VERSION} exactly",
                    dir.display(),
                    v.trim()
                );
            }
        }
        return Ok(());
    }
    let python = venv().join("bin/python");
    let wanted: Vec<(&str, &str)> = std::iter::once(("torch", TORCH_VERSION))
        .chain(PYTHON_PACKAGES)
        .collect();
    let query = format!(
        "import importlib.metadata as m; print(' '.join(m.version(p) for p in {:?}))",
        wanted.iter().map(|(name, _)| *name).collect::<Vec<_>>()
    );
    let installed = Command::new(&python)
        .args(["-c", &query])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let pinned: Vec<&str> = wanted.iter().map(|(_, version)| *version).collect();
    // torch reports `2.9.0+cpu` or `2.9.0+cu128` for the same release.
    let versions: Vec<&str> = installed
        .split(' ')
        .map(|v| v.split('+').next().unwrap_or(v))
        .collect();
    if versions == pinned {
        return Ok(());
    }
    let start = std::time::Instant::now();
    ensure_venv()?;
    let specs: Vec<String> = wanted
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    pip_install(&specs.iter().map(String::as_str).collect::<Vec<_>>())?;
    eprintln!(
        "xtask: torch {TORCH_VERSION} installed into .venv in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The project's virtual environment (`.venv`), made once with python3's venv module, which
/// is installed from Debian where it is missing; returns its python.
fn ensure_venv() -> Result<PathBuf> {
    let python = venv().join("bin/python");
    if python.exists() {
        return Ok(python);
    }
    // Debian's own python3 needs python3-venv to make a virtual environment.
    let has_venv = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_venv {
        apt_install(&[
            DebianPackage {
                name: "python3",
                provides: "Python 3, for the wheels xtask installs (torch; the GPU bundle's nvcc)",
            },
            DebianPackage {
                name: "python3-venv",
                provides: "Python's venv module (`python3 -m venv`)",
            },
        ])?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(venv()))
        .context("creating .venv (on Debian: apt-get install python3-venv)")?;
    Ok(python)
}

/// Installs `packages` from PyPI into `.venv` with uv, itself installed into `.venv` by pip
/// the first time. uv downloads in parallel and links files from its cache, so a fresh clone's
/// `.venv` gets torch (6.6 GB unpacked with its CUDA libraries) in seconds rather than in
/// pip's minutes of unpacking.
fn pip_install(packages: &[&str]) -> Result<()> {
    let python = venv().join("bin/python");
    let uv = venv().join("bin/uv");
    if !uv.exists() {
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            UV,
        ]))?;
    }
    run(Command::new(&uv)
        .args(["pip", "install", "--quiet", "--python"])
        .arg(&python)
        .args(packages))
}

/// The uv release that installs the Python packages.
const UV: &str = "uv==0.13.8";

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir());
    build_env(&mut c);
    c
}

/// What builds and runs of the engines need: libtorch for tch, the datasets, and a runtime
/// dir for burn-wgpu's Vulkan loader.
fn build_env(c: &mut Command) {
    // tch finds libtorch through the venv's python unless the user set LIBTORCH. torch-sys
    // only checks that LIBTORCH_USE_PYTORCH is set, and cargo runs its build script again only
    // when that variable changes: its value is this checkout's venv, so that a build dir shared
    // by two checkouts (CI's clean clone beside a working copy) finds each one's libtorch
    // instead of linking against a venv that may be gone.
    if std::env::var_os("LIBTORCH").is_none() {
        let path = shared_build::search_path("PATH", vec![venv().join("bin")]);
        c.env("LIBTORCH_USE_PYTORCH", venv())
            .env("PATH", path.expect("valid PATH"));
    }
    if let Some(d) = data_dir() {
        c.env("CONVKIT_DATA", d);
    }
    // The Vulkan loader (burn-wgpu) wants a private runtime dir; CI shells often have none.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = target_dir().join("xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            c.env("XDG_RUNTIME_DIR", dir);
        }
    }
}

/// The engine features that build and run on a machine without CUDA (candle-cuda needs nvcc).
const ENGINE_FEATURES: [&str; 5] = ["candle", "tch", "burn-flex", "burn-ndarray", "burn-wgpu"];

/// The engine feature that cannot be built or run without CUDA, which `cargo xtask
/// check-cuda` type-checks alone (and `cargo xtask gpu-bundle` builds).
const CUDA_ONLY_FEATURE: &str = "burn-cuda";

/// The engine features that `cargo xtask test` builds alone, after the test build, reusing its
/// compiled dependencies ([`pins`]).
const SINGLE_FEATURE_BUILDS: [&str; 5] = ENGINE_FEATURES;

/// What `cargo test` is given for the test build, which the notebooks and the single-feature
/// builds share: the workspace with `features` (every engine, plus the notebooks' rich
/// output). The bench package is left out: criterion would change the features of
/// dependencies the notebooks share (benches/Cargo.toml). So are the single-feature builds'
/// pins (they ask only for what this build has, and the notebooks' build must match this one).
fn test_build_args(features: &str) -> [&str; 7] {
    [
        "--workspace",
        "--exclude",
        "convkit-bench",
        "--exclude",
        pins::PACKAGE,
        "--features",
        features,
    ]
}

/// `cargo <verb>` (check or build) of the facade's library and binary with `features` and
/// no defaults, in the shared build, together with `also` (more packages).
fn facade_alone(verb: &str, features: &str, also: &[&str]) -> Result<Command> {
    let mut args = vec![verb, "-p", "convkit"];
    for package in also {
        args.extend(["-p", package]);
    }
    args.extend([
        "--no-default-features",
        "--features",
        features,
        "--bins",
        "--lib",
    ]);
    shared_build::cargo(&args)
}

/// The engine a plain `cargo build` of the facade turns on (its `default` feature).
const DEFAULT_ENGINE: &str = "candle";

/// The `--features` of the build of `feature` alone (one of [`SINGLE_FEATURE_BUILDS`]). The
/// default engine is built as a plain `cargo build` builds it, so core without its features
/// (`evcxr`, `mpi`) is compiled too; every other engine with them, so that core (and candle's
/// and tch's engine crates, which have no features) are the test build's and only the facade
/// and that engine's crate are compiled again.
fn single_feature_build(feature: &str) -> String {
    if feature == DEFAULT_ENGINE {
        format!("convkit/{feature}")
    } else {
        format!("convkit/{feature},convkit/evcxr,convkit/mpi")
    }
}

/// `cargo xtask check-cuda`: the CUDA-only engine type-checked alone, over its whole
/// dependency tree in check mode (about 18 minutes on 2 cores from cold; 10 s warm), which
/// `cargo xtask test` leaves out: it shares nothing with the test build (a check's artifacts
/// are metadata only) and the GPU bundle builds it for real.
fn check_cuda() -> Result<()> {
    let mut check = facade_alone("check", &format!("convkit/{CUDA_ONLY_FEATURE}"), &[])?;
    // burn-cuda's CubeCL pulls tracel-llvm-bundler, whose build script downloads an LLVM
    // bundle from outside the package registries. It skips the download under docs.rs's
    // marker, which a type check does not need (the GPU bundle links stubs instead).
    check.env("DOCS_RS", "1");
    run(&mut check)
}

/// Everything CI runs, each step timed into `steps`: setup, the test build, each engine feature
/// that builds here built alone, each test binary, and every notebook on a subset (burn-cuda:
/// [`check_cuda`]). The builds, the tests and the notebooks share one build ([`shared_build`]).
fn test(extra: &[String], steps: &mut Steps) -> Result<()> {
    // Needs only cargo: it builds beside everything else, ready before the tests run.
    let evcxr = notebooks::EvcxrInstall::start()?;
    steps.time("setup", || {
        setup(Needs::EVERYTHING).and_then(|()| shared_build::prepare())
    })?;
    // Every crate of the lock for this platform, CUDA engines' and benches' included, so that
    // nothing after this needs the network (xtask's own tests read the whole locked tree).
    let mut fetch = cargo(&["fetch", "--locked", "--target", &shared_build::host()?]);
    steps.time("fetch crates", || run(&mut fetch))?;
    let features = shared_build::features();
    let mut test = vec!["test"];
    test.extend(test_build_args(&features));
    let mut build = shared_build::cargo(&test)?;
    build.arg("--no-run").args(extra);
    steps.time("build tests", || run(&mut build))?;
    if let TestData::Download { into } = TestData::choose(data_dir(), cache_home())? {
        println!(
            "no CONVKIT_DATA and no ../shared/datasets: downloading the tests' datasets into {}",
            into.display()
        );
        let mut download = shared_build::built_convkit()?;
        download.args(["download", "mnist", "cifar10"]);
        download
            .env_remove("CONVKIT_OFFLINE")
            .env_remove("CONVKIT_DATA");
        steps.time("download datasets", || run(&mut download))?;
        DOWNLOADED.get_or_init(|| into);
    }
    // Each engine feature alone must compile: no feature may lean on another. Each is built
    // alone (`build`, not `check`: with the pins, every dependency resolves as in the test
    // build and is reused from it, so only our crates are compiled; a `check` would type-check
    // the whole tree once more), see `single_feature_build`.
    for feature in SINGLE_FEATURE_BUILDS {
        let engine = single_feature_build(feature);
        let mut alone = facade_alone("build", &engine, &[pins::PACKAGE])?;
        steps.time(&format!("build {feature} alone"), || run(&mut alone))?;
    }
    let mut c = shared_build::cargo(&test)?;
    c.args(extra).env("CONVKIT_OFFLINE", "1");
    // Every notebook, in the real evcxr kernel, on a small subset, while the tests run: a
    // notebook spends most of its time in evcxr compiling and linking one cell after another
    // on one core, and the tests leave cores idle too. (Cargo holds the target dir's lock only
    // while it builds, so evcxr's builds and the running tests do not wait on each other.)
    let mut notebook_steps = Steps::new();
    let (tests, notebooks) = std::thread::scope(|scope| {
        let notebooks =
            scope.spawn(|| notebooks::run_notebooks(false, &[], Some(evcxr), &mut notebook_steps));
        let tests = run_counting_tests(&mut c, steps);
        (tests, notebooks.join())
    });
    steps.append(notebook_steps);
    let (passed, failed) = tests?;
    let notebooks = notebooks.map_err(|_| anyhow::anyhow!("the notebook thread panicked"))??;
    // One closing line for the whole run (cargo's own last line is that of the last crate).
    println!("tests: {passed} passed, {failed} failed; notebooks: {notebooks} ran");
    Ok(())
}

/// The criterion benches (`benches/engines.rs`; `benches/overhead.rs`: convkit's step beside
/// a plain engine loop; `benches/kernels.rs`: convkit-cpu's kernels alone) with every engine
/// that builds here. The
/// bench binary finds libtorch through `LD_LIBRARY_PATH` (only the facade's binaries get an
/// rpath to it).
fn bench(extra: &[String]) -> Result<()> {
    let features = ENGINE_FEATURES.join(",");
    let mut c = cargo(&[
        "bench",
        "-p",
        "convkit-bench",
        "--features",
        &features,
        "--",
    ]);
    let torch = notebooks::libtorch_lib()?;
    c.env("LD_LIBRARY_PATH", shared_build::library_path(vec![torch])?)
        .args(extra);
    run(&mut c)
}

fn compare(extra: &[String]) -> Result<()> {
    let features = ENGINE_FEATURES.join(",");
    let mut c = cargo(&[
        "run",
        "--release",
        "--features",
        &features,
        "--bin",
        "convkit",
        "--",
        "compare",
    ]);
    c.args(extra);
    run(&mut c)
}

fn tutorial(extra: &[String]) -> Result<()> {
    let mut args = vec![
        "run",
        "--release",
        "--bin",
        "convkit",
        "--",
        "train",
        "--dataset",
        "mnist",
        "--model",
        "tutorial-mnist",
        "--out",
        "runs/tutorial-mnist",
        // The quick start's demo folder: each run of it starts over.
        "--overwrite",
    ];
    let has_epochs = extra.iter().any(|a| a == "--epochs");
    if !has_epochs {
        args.extend(["--epochs", "1"]);
    }
    let mut c = cargo(&args);
    c.args(extra);
    run(&mut c)?;
    // The commands after the tutorial use this build, not another in ./target.
    let bin = target_dir().join("release");
    println!(
        "\nThe convkit command is {}; to run it as `convkit`:\n  export PATH=\"{}:$PATH\"",
        bin.join("convkit").display(),
        bin.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::test_binary_name;
    use super::{root, shared_build};
    use anyhow::{bail, Context, Result};
    use std::process::Command;

    /// `cargo metadata` of the locked tree with every feature, for this machine's platform, read
    /// offline: from the crates `cargo xtask test` fetches first (`cargo fetch --locked --target
    /// <host>`), so it needs no network and sees the CUDA engines' crates too.
    fn locked_metadata() -> Result<serde_json::Value> {
        let mut metadata = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        metadata
            .args(["metadata", "--format-version", "1", "--locked", "--offline"])
            .args([
                "--all-features",
                "--filter-platform",
                &shared_build::host()?,
            ]);
        let out = metadata.current_dir(root()).output()?;
        if !out.status.success() {
            bail!(
                "{metadata:?} failed (`cargo fetch --locked --target <host>` gets what it needs): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Fails unless the workspace's `rust-version` is what the locked tree needs with every
    /// feature on: the highest `rust-version` of any package not ours. No lower, or an older
    /// toolchain fails on a dependency; no higher, or it turns away toolchains that would work.
    fn check_rust_version() -> Result<()> {
        let metadata = locked_metadata()?;
        let version = |text: &str| -> Result<Vec<u32>> {
            text.split('.')
                .map(|part| part.parse().with_context(|| format!("rust-version {text}")))
                .collect()
        };
        let mut needed = (vec![0], String::new());
        for package in metadata["packages"].as_array().into_iter().flatten() {
            let (Some(v), false) = (
                package["rust_version"].as_str(),
                package["source"].is_null(),
            ) else {
                continue;
            };
            if version(v)? > needed.0 {
                needed = (
                    version(v)?,
                    format!(
                        "{} {} (rust-version {v})",
                        package["name"], package["version"]
                    ),
                );
            }
        }
        let manifest: toml::Value =
            toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml"))?)?;
        let ours = manifest["workspace"]["package"]["rust-version"]
            .as_str()
            .context("Cargo.toml has no workspace.package.rust-version")?;
        if version(ours)? != needed.0 {
            bail!(
                "Cargo.toml's rust-version is {ours}; the locked tree needs exactly what {} needs",
                needed.1
            );
        }
        Ok(())
    }

    #[test]
    fn test_data_is_the_given_copy_else_a_download_into_the_cache() {
        use super::TestData;
        use std::path::PathBuf;
        let shared = PathBuf::from("/w/shared/datasets");
        let cache = PathBuf::from("/home/u/.cache");
        assert_eq!(
            TestData::choose(Some(shared.clone()), Some(cache.clone())).unwrap(),
            TestData::Given(shared)
        );
        assert_eq!(
            TestData::choose(None, Some(cache)).unwrap(),
            TestData::Download {
                into: PathBuf::from("/home/u/.cache/convkit")
            }
        );
        let err = TestData::choose(None, None).unwrap_err().to_string();
        assert!(err.contains("set CONVKIT_DATA"), "{err}");
    }

    #[test]
    fn test_binaries_are_named_by_binary_and_source() {
        let name = |l| test_binary_name(l);
        assert_eq!(
            name("     Running unittests src/lib.rs (target/x86_64-unknown-linux-gnu/debug/deps/convkit_core-9a1b2c3d)").as_deref(),
            Some("test convkit_core (src/lib.rs)")
        );
        assert_eq!(
            name("     Running tests/cli.rs (target/debug/deps/cli-0f3a)").as_deref(),
            Some("test cli (tests/cli.rs)")
        );
        assert_eq!(
            name("   Doc-tests convkit_core").as_deref(),
            Some("doc-tests convkit_core")
        );
        assert_eq!(name("   Compiling convkit v0.1.0"), None);
        assert_eq!(name("test result: ok. 3 passed"), None);
    }

    /// The crates `.cargo/config.toml` builds unoptimised as compile-time only (its paragraph
    /// "What runs only while compiling") are never linked into a program: each is reached only
    /// through a build dependency or a proc macro, whatever features are on. Every package the
    /// config names is in the locked tree, so no entry is dead.
    #[test]
    fn the_unoptimised_compile_time_crates_run_only_while_compiling() {
        use std::collections::{BTreeSet, HashMap, HashSet};
        let metadata = locked_metadata().unwrap();
        let packages: HashMap<&str, &serde_json::Value> = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["id"].as_str().unwrap(), p))
            .collect();
        let is_proc_macro = |id: &str| {
            packages[id]["targets"].as_array().unwrap().iter().any(|t| {
                t["kind"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k == "proc-macro")
            })
        };
        let nodes: HashMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["id"].as_str().unwrap(), n))
            .collect();
        let members: HashSet<&str> = metadata["workspace_members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        // Walk from our crates; a step through a build dependency or into a proc macro leads
        // to what runs while compiling. Dev-dependencies count only for our own crates.
        let (mut linked, mut seen) = (BTreeSet::new(), HashSet::new());
        let mut stack: Vec<(&str, bool)> = members.iter().map(|&m| (m, false)).collect();
        while let Some((id, compile_time)) = stack.pop() {
            if !seen.insert((id, compile_time)) {
                continue;
            }
            if !compile_time {
                linked.insert(packages[id]["name"].as_str().unwrap());
            }
            for dep in nodes[id]["deps"].as_array().unwrap() {
                let to = dep["pkg"].as_str().unwrap();
                for kind in dep["dep_kinds"].as_array().unwrap() {
                    let kind = kind["kind"].as_str();
                    if kind == Some("dev") && !members.contains(id) {
                        continue;
                    }
                    stack.push((
                        to,
                        compile_time || kind == Some("build") || is_proc_macro(to),
                    ));
                }
            }
        }
        let in_tree: BTreeSet<&str> = packages
            .values()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let config = std::fs::read_to_string(root().join(".cargo/config.toml")).unwrap();
        let named = |text: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix("[profile.dev.package.")?.strip_suffix(']'))
                .filter(|name| *name != "\"*\"")
                .map(String::from)
                .collect()
        };
        for name in named(&config) {
            assert!(
                in_tree.contains(name.as_str()),
                "{name} is not in the locked tree"
            );
        }
        let start = config.find("# What runs only while compiling").unwrap();
        let paragraph = &config[start..];
        let paragraph = &paragraph[..paragraph.find("\n\n").unwrap_or(paragraph.len())];
        let compile_time = named(paragraph);
        assert!(compile_time.len() > 10, "{compile_time:?}");
        for name in compile_time {
            assert!(
                !linked.contains(name.as_str()),
                "{name} is linked into a program"
            );
        }
    }

    /// The workspace's `rust-version` is what the locked tree needs, all features on.
    #[test]
    fn rust_version_is_the_locked_trees_minimum() {
        check_rust_version().unwrap();
    }
}
