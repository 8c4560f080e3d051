//! `cargo xtask notebooks`: run the evcxr Jupyter notebooks under `notebooks/` with the real
//! evcxr kernel. CI runs each on a small subset (`CONVKIT_NOTEBOOK_LIMIT`), under the test
//! build's features so that evcxr reuses the tests' dependencies (see [`crate::shared_build`]),
//! and fails when a cell fails; `--full` runs them as written and saves their outputs into the
//! notebooks.
//!
//! Everything lives under `<target dir>/notebooks`: the evcxr_jupyter install, its kernel
//! spec, evcxr's compile folder (reused between runs, and the tests' target dir) and the
//! executed copies.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::shared_build::{self, home, library_path, std_lib_dir};
use crate::steps::Steps;
use crate::{apt_install, build_env, pip_install, run, venv, DebianPackage};

/// The evcxr_jupyter release the notebooks are tested with.
const EVCXR_VERSION: &str = "0.22.0";
/// The Jupyter client that executes notebooks (`jupyter execute`), and its format library.
const JUPYTER_PACKAGES: [&str; 2] = ["nbclient==0.11.0", "nbformat==5.11.1"];
/// Images of each split in the CI run.
const CI_LIMIT: &str = "200";

/// The notebooks, in order.
fn notebooks(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("notebooks"))
        .context("reading notebooks/")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ipynb"))
        .collect();
    found.sort();
    Ok(found)
}

/// `cargo install` of evcxr_jupyter, started in the background ([`EvcxrInstall::start`]) at
/// normal priority, beside the checks and the test build, then waited for before the first
/// notebook. (At the lowest priority it got almost no CPU beside a build that keeps both cores
/// busy, so the notebooks started only after the tests and ran alone on one core;
/// docs/measurements.md.)
pub struct EvcxrInstall {
    child: std::process::Child,
    log: PathBuf,
}

impl EvcxrInstall {
    /// Starts `cargo install evcxr_jupyter` (quick when it is installed already),
    /// its output going to `<notebooks>/evcxr-install.log`.
    pub fn start() -> Result<Self> {
        let home = home();
        std::fs::create_dir_all(&home)?;
        let log = home.join("evcxr-install.log");
        let out = std::fs::File::create(&log)?;
        let mut install = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        install
            .args([
                "install",
                "--locked",
                "evcxr_jupyter",
                "--version",
                EVCXR_VERSION,
                "--root",
            ])
            .arg(home.join("evcxr"))
            .arg("--target-dir")
            .arg(home.join("evcxr-build"))
            .stdout(out.try_clone()?)
            .stderr(out);
        eprintln!(
            "xtask: starting {install:?} in the background (log: {})",
            log.display()
        );
        let child = install
            .spawn()
            .context("starting cargo install evcxr_jupyter")?;
        Ok(Self { child, log })
    }

    /// Waits for the install; on failure, shows the end of its log.
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait()?;
        if status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        bail!(
            "cargo install evcxr_jupyter failed with {status} (log: {})",
            self.log.display()
        )
    }
}

impl Drop for EvcxrInstall {
    /// An install still running when the run fails is stopped, not left behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// evcxr_jupyter (the install `started` earlier, or one started now), the Jupyter client in
/// `.venv`, the kernel spec, and the Rust standard library's sources, which evcxr's type
/// inference reads. Returns the kernel's environment.
fn setup(started: Option<EvcxrInstall>) -> Result<Vec<(String, std::ffi::OsString)>> {
    shared_build::prepare()?;
    let home = home();
    match started {
        Some(install) => install.finish()?,
        None => EvcxrInstall::start()?.finish()?,
    }
    pip_install(&JUPYTER_PACKAGES)?;
    let jupyter_path = home.join("jupyter");
    run(Command::new(home.join("evcxr/bin/evcxr_jupyter"))
        .arg("--install")
        .env("JUPYTER_PATH", &jupyter_path))?;

    let sysroot = shared_build::sysroot()?;
    let mut env = vec![("JUPYTER_PATH".to_string(), jupyter_path.into_os_string())];
    // rustup's rust-src when installed; else Debian's copy (rustup cannot download here).
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        apt_install(&[DebianPackage {
            name: "rust-web-src",
            provides: "the Rust standard library's sources, which evcxr's type inference reads (or `rustup component add rust-src`)",
        }])?;
        let library = std::fs::read_dir("/usr/src")?
            .filter_map(|e| e.ok().map(|e| e.path().join("library")))
            .find(|p| p.join("core/src/lib.rs").is_file())
            .context("rust-web-src installed no /usr/src/rustc-*/library")?;
        env.push(("RUST_SRC_PATH".into(), library.into_os_string()));
    }
    // evcxr loads each cell as a shared library linked against the toolchain's libstd; its
    // relative rpath misses when the compile folder is under the same home as the toolchain.
    // libtorch, for the tch notebooks, comes from the torch wheel in .venv.
    let torch = libtorch_lib()?;
    env.push((
        "LD_LIBRARY_PATH".into(),
        library_path(vec![std_lib_dir()?, torch])?,
    ));
    let tmp = shared_build::evcxr_tmpdir();
    std::fs::create_dir_all(&tmp)?;
    env.push(("EVCXR_TMPDIR".into(), tmp.into_os_string()));
    Ok(env)
}

/// libtorch's library folder: `$LIBTORCH/lib` when set, else the torch wheel's in `.venv`.
pub fn libtorch_lib() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        return Ok(PathBuf::from(dir).join("lib"));
    }
    torch_lib()
}

/// The torch wheel's library folder in `.venv`.
fn torch_lib() -> Result<PathBuf> {
    let out = Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .context("asking .venv's python where torch is")?;
    if !out.status.success() {
        bail!(
            "torch is not importable in .venv: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Run every notebook (or those whose file name contains one of `only`): on the CI subset
/// into `<target>/notebooks/executed/`, or with `full` as written, saving the outputs into
/// the notebooks themselves (written to a temporary name, then renamed). `evcxr` is an
/// install started earlier, if any. Each step's time goes into `steps`.
pub fn run_notebooks(
    full: bool,
    only: &[String],
    evcxr: Option<EvcxrInstall>,
    steps: &mut Steps,
) -> Result<usize> {
    let env = steps.time("finish evcxr_jupyter install, nbclient", || setup(evcxr))?;
    let root = crate::root();
    let driver = home().join("execute_notebook.py");
    std::fs::write(&driver, include_str!("execute_notebook.py"))?;
    let executed = home().join("executed");
    std::fs::create_dir_all(&executed)?;
    // evcxr's startup commands, and nothing from the user's own evcxr config. The CI subset
    // is small, so its build skips optimisation (`:opt 0`), which makes evcxr's first build of
    // the engines faster (docs/measurements.md). A full run keeps evcxr's default, `:opt 2`.
    let config = home().join(if full { "config-full" } else { "config-ci" });
    std::fs::create_dir_all(&config)?;
    let init = if full { "" } else { ":opt 0\n" };
    std::fs::write(config.join("init.evcxr"), init)?;
    let chosen: Vec<PathBuf> = notebooks(&root)?
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            only.is_empty() || only.iter().any(|o| name.contains(o.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        bail!("no notebook under notebooks/ matches {only:?}");
    }
    for notebook in &chosen {
        let name = notebook
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        steps.time(&format!("notebook {name}"), || {
            let output = executed.join(format!("{name}.ipynb"));
            let mut kernel = Command::new(venv().join("bin/python"));
            // evcxr builds each cell with cargo: tch's build needs libtorch as for the tests,
            // and evcxr's own RUSTFLAGS must not be overridden.
            build_env(&mut kernel);
            kernel
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("CONVKIT_OFFLINE", "1")
                .env("EVCXR_CONFIG_DIR", &config)
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                // Every cell runs; `check_outputs` then reports each failure.
                .arg(&driver)
                .arg(notebook)
                .arg(&output)
                .arg(root.join("notebooks"))
                // The versions the workspace is tested with (the driver says why it copies).
                .arg(root.join("Cargo.lock"))
                .arg(shared_build::evcxr_tmpdir().join("Cargo.lock"));
            if full {
                kernel.env_remove("CONVKIT_NOTEBOOK_LIMIT");
            } else {
                kernel
                    .env("CONVKIT_NOTEBOOK_LIMIT", CI_LIMIT)
                    .arg(shared_build::features());
            }
            run(&mut kernel).with_context(|| format!("running notebook {name}"))?;
            check_outputs(&output).with_context(|| format!("notebook {name} failed"))?;
            if full {
                let tmp = notebook.with_extension("ipynb.tmp");
                std::fs::copy(&output, &tmp)?;
                std::fs::rename(&tmp, notebook)?;
            }
            Ok(())
        })?;
    }
    Ok(chosen.len())
}

/// Fail on any cell that failed (see [`failures`]), naming each.
fn check_outputs(executed: &Path) -> Result<()> {
    let text = std::fs::read_to_string(executed)
        .with_context(|| format!("reading {}", executed.display()))?;
    let failures = failures(&text).with_context(|| format!("parsing {}", executed.display()))?;
    if failures.is_empty() {
        return Ok(());
    }
    for f in &failures {
        eprintln!("xtask: {f}");
    }
    bail!(
        "{} failing output(s), the first: {}",
        failures.len(),
        failures[0]
    )
}

/// The failed cells of an executed notebook (JSON). A compile error or a panic is an `error`
/// output. An error returned by `?` is not: evcxr only prints it to stderr and carries on, so
/// any stderr line counts as a failure too (`fit` reports progress on stdout in a notebook).
fn failures(notebook_json: &str) -> Result<Vec<String>> {
    let notebook: serde_json::Value = serde_json::from_str(notebook_json)?;
    let joined = |v: &serde_json::Value| match v {
        serde_json::Value::Array(lines) => lines.iter().filter_map(|l| l.as_str()).collect(),
        other => other.as_str().unwrap_or_default().to_string(),
    };
    let mut failures = Vec::new();
    let cells = notebook["cells"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, cell) in cells.iter().enumerate() {
        let outputs = cell["outputs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for output in outputs {
            match output["output_type"].as_str() {
                Some("error") => failures.push(format!(
                    "cell {}: {}: {}",
                    i + 1,
                    output["ename"].as_str().unwrap_or("error"),
                    output["evalue"].as_str().unwrap_or_default()
                )),
                Some("stream") if output["name"] == "stderr" => {
                    let text: String = joined(&output["text"]);
                    for line in text.lines() {
                        if !line.trim().is_empty() {
                            failures.push(format!("cell {}: {line}", i + 1));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::failures;

    #[test]
    fn errors_and_stderr_fail_a_notebook_and_stdout_does_not() {
        let notebook = r#"{"cells": [
            {"cell_type": "markdown", "source": "prose"},
            {"cell_type": "code", "outputs": [
                {"output_type": "stream", "name": "stdout", "text": ["Epoch 1/1 - 4/4 - 0.2s - loss: 2.27\n"]},
                {"output_type": "stream", "name": "stdout", "text": "fine\n"}]},
            {"cell_type": "code", "outputs": [
                {"output_type": "stream", "name": "stderr", "text": ["invalid digit found in string\n"]}]},
            {"cell_type": "code", "outputs": [
                {"output_type": "error", "ename": "Error", "evalue": "`Table` doesn't implement `Debug`", "traceback": []}]}
        ]}"#;
        assert_eq!(
            failures(notebook).unwrap(),
            [
                "cell 3: invalid digit found in string",
                "cell 4: Error: `Table` doesn't implement `Debug`"
            ]
        );
        assert!(failures(r#"{"cells": []}"#).unwrap().is_empty());
        assert!(failures("not json").is_err());
    }
}
