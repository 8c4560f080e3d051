//! The one build that `cargo xtask test`'s checks, tests and notebooks share.
//!
//! evcxr compiles every notebook cell as a crate of its own that depends on convkit. It runs
//! cargo in its own folder (`EVCXR_TMPDIR`) with `CARGO_TARGET_DIR=target`, `--target <host>`,
//! `RUSTFLAGS=-Cprefer-dynamic` (plus `-Clink-arg=-fuse-ld=lld` when it links with lld) and a
//! generated `[profile.dev]`. Cargo reuses a compiled dependency only when its features,
//! profile, target and flags all match. So the tests are built the way evcxr builds:
//! - in evcxr's target dir, with its `--target` and `RUSTFLAGS`, and under `mold -run` when
//!   evcxr links with mold;
//! - with the dependency profile of `.cargo/config.toml`, which [`share_profile_with_evcxr`]
//!   copies to where evcxr's cargo reads it;
//! - with the notebooks running in CI under the tests' feature set ([`features`]).
//!
//! evcxr then compiles only convkit's own crates (which cargo never shares between two
//! workspaces) and each cell, instead of building every engine a second time
//! (docs/measurements.md has the times).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{build_env, root};

/// The features of the test build: every engine that builds here, the notebooks' rich
/// output, and MPI. The notebooks run under the same set in CI.
pub fn features() -> String {
    format!("{},evcxr,mpi", crate::ENGINE_FEATURES.join(","))
}

/// How evcxr links, which it chooses by what is on `PATH` (evcxr 0.22's `create_initial_config`).
enum Linker {
    /// `mold -run cargo …`; RUSTFLAGS unchanged.
    Mold,
    /// `-Clink-arg=-fuse-ld=lld` added to RUSTFLAGS.
    Lld,
    /// The C compiler's default linker.
    System,
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn linker() -> Linker {
    if on_path("mold") {
        Linker::Mold
    } else if on_path("lld") {
        Linker::Lld
    } else {
        Linker::System
    }
}

/// evcxr's `RUSTFLAGS`, in its order.
fn rustflags() -> String {
    match linker() {
        Linker::Lld => "-Cprefer-dynamic -Clink-arg=-fuse-ld=lld".into(),
        Linker::Mold | Linker::System => "-Cprefer-dynamic".into(),
    }
}

/// The notebooks' folder under the project's target dir: evcxr's home, its compile folder and
/// the executed notebooks.
pub fn home() -> PathBuf {
    crate::target_dir().join("notebooks")
}

/// evcxr's compile folder (`EVCXR_TMPDIR`), kept between runs.
pub fn evcxr_tmpdir() -> PathBuf {
    home().join("evcxr-tmp")
}

/// Where the shared build goes: evcxr's target dir.
fn target_dir() -> PathBuf {
    evcxr_tmpdir().join("target")
}

/// The toolchain's sysroot (`rustc --print sysroot`).
pub fn sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The host's target triple (`rustc -vV`), which evcxr passes as `--target`.
pub fn host() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV printed no host line")
}

/// The toolchain's standard library as a shared object: `-Cprefer-dynamic` binaries (the
/// tests here, evcxr's cells) load it at run time.
pub fn std_lib_dir() -> Result<PathBuf> {
    Ok(sysroot()?.join("lib/rustlib").join(host()?).join("lib"))
}

/// The `convkit` binary the shared build made last (the test build's, or a single-feature
/// build's), ready to run: it loads the standard library as a shared object.
pub fn built_convkit() -> Result<Command> {
    let mut c = Command::new(target_dir().join(host()?).join("debug/convkit"));
    c.env("LD_LIBRARY_PATH", library_path(vec![std_lib_dir()?])?);
    Ok(c)
}

/// `LD_LIBRARY_PATH` with `dirs` in front of what is already there.
pub fn library_path(dirs: Vec<PathBuf>) -> Result<std::ffi::OsString> {
    search_path("LD_LIBRARY_PATH", dirs)
}

/// The search path in the variable `name` (`PATH`, `LD_LIBRARY_PATH`) with `dirs` in front of
/// what is already there.
pub fn search_path(name: &str, dirs: Vec<PathBuf>) -> Result<std::ffi::OsString> {
    let mut all = dirs;
    if let Some(old) = std::env::var_os(name) {
        all.extend(std::env::split_paths(&old));
    }
    Ok(std::env::join_paths(all)?)
}

/// Puts `.cargo/config.toml` above evcxr's folder, with our crates' `[profile.dev]` added
/// ([`evcxr_config`]). Cargo reads config files from the folder it runs in and every parent,
/// and a config file's profile overrides the `[profile.dev]` evcxr generates. (evcxr writes
/// its own `.cargo/config.toml` inside its folder, hence the parent.)
fn share_profile_with_evcxr() -> Result<()> {
    let dir = home().join(".cargo");
    std::fs::create_dir_all(&dir)?;
    let read = |path: &str| {
        std::fs::read_to_string(root().join(path)).with_context(|| format!("reading {path}"))
    };
    let config = evcxr_config(&read(".cargo/config.toml")?, &read("Cargo.toml")?)?;
    crate::write_atomically(&dir.join("config.toml"), &config)
}

/// The config evcxr's cargo reads: the project's config (the dependency profile) and, for each
/// of our library crates, the workspace's `[profile.dev]` as a per-package profile. Our crates
/// are the one part evcxr builds again (cargo hashes a path dependency by its path relative to
/// the workspace root, so a member of ours and a dependency of evcxr's never match); as
/// dependencies they would get the optimised dependency profile, and this keeps that rebuild
/// as quick as the tests' own.
fn evcxr_config(project_config: &str, manifest: &str) -> Result<String> {
    let manifest: toml::Table = manifest.parse().context("parsing Cargo.toml")?;
    let mut profile = manifest
        .get("profile")
        .and_then(|p| p.get("dev"))
        .and_then(toml::Value::as_table)
        .cloned()
        .context("Cargo.toml has no [profile.dev]")?;
    // Cargo allows these only for the whole profile; the project config sets rpath for both.
    for whole_profile_only in ["panic", "lto", "rpath", "package", "build-override"] {
        profile.remove(whole_profile_only);
    }
    let name = |t: &toml::Table| t.get("name").and_then(|n| n.as_str()).map(String::from);
    let mut crates: Vec<String> = manifest
        .get("package")
        .and_then(|p| p.as_table())
        .and_then(name)
        .into_iter()
        .collect();
    if let Some(deps) = manifest
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(toml::Value::as_table)
    {
        crates.extend(
            deps.iter()
                .filter(|(_, d)| d.get("path").is_some())
                .map(|(n, _)| n.clone()),
        );
    }
    let mut packages = toml::Table::new();
    for name in crates {
        packages.insert(name, toml::Value::Table(profile.clone()));
    }
    let mut dev = toml::Table::new();
    dev.insert("package".into(), toml::Value::Table(packages));
    let mut profiles = toml::Table::new();
    profiles.insert("dev".into(), toml::Value::Table(dev));
    let mut ours = toml::Table::new();
    ours.insert("profile".into(), toml::Value::Table(profiles));
    Ok(format!(
        "# Written by `cargo xtask` from .cargo/config.toml and Cargo.toml's [profile.dev].\n{project_config}\n{}",
        toml::to_string(&ours)?
    ))
}

/// What the shared build needs before it starts: mold, so that evcxr and the tests link with
/// the same fast linker (evcxr picks it by itself when it is installed), and the profile copy.
pub fn prepare() -> Result<()> {
    crate::apt_install(&[crate::DebianPackage {
        name: "mold",
        provides: "the mold linker, which evcxr uses when it is installed",
    }])?;
    share_profile_with_evcxr()
}

/// `cargo <args> --target <host>` in the shared build: evcxr's target dir, RUSTFLAGS and
/// linker, the standard library on the library path, and what the engines need ([`build_env`]).
pub fn cargo(args: &[&str]) -> Result<Command> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = match linker() {
        Linker::Mold => {
            let mut c = Command::new("mold");
            c.arg("-run").arg(cargo);
            c
        }
        Linker::Lld | Linker::System => Command::new(cargo),
    };
    c.args(args)
        .arg("--target")
        .arg(host()?)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir())
        .env("RUSTFLAGS", rustflags())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("LD_LIBRARY_PATH", library_path(vec![std_lib_dir()?])?);
    build_env(&mut c);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::evcxr_config;

    #[test]
    fn evcxr_gets_the_dependency_profile_and_the_members_profile_for_our_crates() {
        let manifest = r#"
            [workspace.dependencies]
            convkit-core = { path = "crates/convkit-core", version = "0.1.0" }
            anyhow = "1"
            [package]
            name = "convkit"
            [profile.dev]
            opt-level = 1
            debug = "line-tables-only"
            incremental = true
            panic = "unwind"
        "#;
        let config =
            evcxr_config("[profile.dev.package.\"*\"]\nopt-level = 3\n", manifest).unwrap();
        let parsed: toml::Table = config.parse().unwrap();
        let packages = &parsed["profile"]["dev"]["package"];
        assert_eq!(packages["*"]["opt-level"].as_integer(), Some(3));
        for ours in ["convkit", "convkit-core"] {
            let p = packages[ours].as_table().unwrap();
            assert_eq!(p["opt-level"].as_integer(), Some(1));
            assert_eq!(p["debug"].as_str(), Some("line-tables-only"));
            assert!(!p.contains_key("panic"), "cargo refuses panic per package");
        }
        assert!(packages.get("anyhow").is_none());
    }

    #[test]
    fn the_project_config_and_the_manifest_make_a_valid_evcxr_config() {
        let read = |p: &str| std::fs::read_to_string(crate::root().join(p)).unwrap();
        let config = evcxr_config(&read(".cargo/config.toml"), &read("Cargo.toml")).unwrap();
        let parsed: toml::Table = config.parse().unwrap();
        let packages = parsed["profile"]["dev"]["package"].as_table().unwrap();
        for ours in [
            "convkit",
            "convkit-core",
            "convkit-candle",
            "convkit-tch",
            "convkit-burn",
        ] {
            assert!(packages.contains_key(ours), "{ours} missing from {config}");
        }
    }
}
