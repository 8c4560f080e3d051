//! The feature pins of the single-feature builds (`xtask/check-pins/Cargo.toml`).
//!
//! `cargo xtask test` proves that each engine feature compiles alone by building the facade
//! and that engine's crate with only that feature, after the test build. Cargo reuses a
//! compiled dependency only when it resolves with the same features, and each engine alone
//! turns on fewer features of shared crates (serde, half, rustix, burn's and CubeCL's crates,
//! ...) than all engines together: every crate above such a crate would be compiled once more
//! per engine. Built together with `convkit-check-pins`, whose dependencies ask for the test
//! build's features, every external crate resolves exactly as in the test build, and only our
//! own crates are compiled again. [`missing`] finds the crates that still differ;
//! `cargo xtask pins` prints the lines that make them agree.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, SINGLE_FEATURE_BUILDS};

/// The package that carries the pins.
pub const PACKAGE: &str = "convkit-check-pins";

/// Which side of the build a crate is compiled for: build scripts, proc macros and their
/// dependencies (`Host`) resolve their features apart from the rest (`Target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Target,
    Host,
}

/// A package as `cargo tree` names it (`serde v1.0.229`), and its side.
type Unit = (String, Side);

/// Every unit of a `cargo tree` and the feature sets it is built with (one, unless cargo
/// builds it twice).
type FeatureSets = BTreeMap<Unit, BTreeSet<BTreeSet<String>>>;

/// The units of `cargo tree -e normal,build <args>` on the host and their features, read from
/// its indented output: a unit is on the host side when it is a proc macro, a build
/// dependency (under a `[build-dependencies]` header), or below one.
fn feature_sets(args: &[&str]) -> Result<FeatureSets> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["tree", "-e", "normal,build", "-f", "{p}|{f}", "--target"])
        .arg(crate::shared_build::host()?)
        .args(args)
        .current_dir(root())
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_tree(&String::from_utf8(out.stdout)?))
}

fn parse_tree(tree: &str) -> FeatureSets {
    let mut sets = FeatureSets::new();
    // host[d]: whether the unit last seen at depth d is on the host side; build[d]: whether
    // the units at depth d under the current parent are build dependencies.
    let (mut host, mut build) = (Vec::<bool>::new(), Vec::<bool>::new());
    for line in tree.lines() {
        let Some(start) = line.find(|c: char| c.is_alphanumeric() || c == '[') else {
            continue;
        };
        // Every level of the tree's prefix is four characters wide.
        let depth = line[..start].chars().count() / 4;
        let body = &line[start..];
        build.resize(depth + 2, false);
        if body.starts_with('[') {
            build[depth + 1] = body.starts_with("[build-dependencies]");
            continue;
        }
        let proc_macro = body.contains(" (proc-macro)");
        let body = body.replace(" (*)", "").replace(" (proc-macro)", "");
        let Some((package, features)) = body.split_once('|') else {
            continue;
        };
        let on_host = proc_macro || build[depth] || (depth > 0 && host[depth - 1]);
        host.resize(depth + 1, false);
        host[depth] = on_host;
        build[depth + 1] = false;
        let side = if on_host { Side::Host } else { Side::Target };
        let features = features
            .split(',')
            .filter(|f| !f.is_empty())
            .map(String::from)
            .collect();
        sets.entry((package.to_string(), side))
            .or_default()
            .insert(features);
    }
    sets
}

/// The external crates whose features differ between a single-feature build (with [`PACKAGE`])
/// and the test build, each with its features in the test build: empty when the pins are
/// complete. A crate the test build does not have cannot be pinned; it is an error. Crates that
/// a pinned feature pulls in count too, so adding what this returns and asking again reaches a
/// set that needs nothing more.
pub fn missing() -> Result<BTreeMap<Unit, BTreeSet<String>>> {
    let features = crate::shared_build::features();
    let mut tree_args: Vec<&str> = vec!["-e", "dev"];
    tree_args.extend(crate::test_build_args(&features));
    let reference = feature_sets(&tree_args)?;
    // Path packages (ours) print their folder: `convkit-core v0.1.0 (/…/crates/convkit-core)`.
    let ours = |package: &str| package.contains(" (/");
    let mut missing = BTreeMap::new();
    for feature in SINGLE_FEATURE_BUILDS {
        let engine = crate::single_feature_build(feature);
        let args = [
            "--no-default-features",
            "-p",
            "convkit",
            "-p",
            PACKAGE,
            "--features",
            &engine,
        ];
        for (unit, sets) in feature_sets(&args)? {
            if ours(&unit.0) {
                continue;
            }
            let Some(wanted) = reference.get(&unit) else {
                bail!(
                    "{} ({:?} side) is in the build of `{feature}` alone but not in the test build, so no pin can make the two share it",
                    unit.0,
                    unit.1
                );
            };
            if sets != *wanted {
                missing.insert(unit, wanted.iter().flatten().cloned().collect());
            }
        }
    }
    Ok(missing)
}

/// `[dependencies]` and `[build-dependencies]` lines for `units`: each crate at its version,
/// without its default features, with the features given (`default` among them when used).
pub fn manifest_lines(units: &BTreeMap<Unit, BTreeSet<String>>) -> String {
    let mut text = String::new();
    for (side, header) in [
        (Side::Target, "[dependencies]"),
        (Side::Host, "[build-dependencies]"),
    ] {
        let on_side: Vec<_> = units.iter().filter(|((_, s), _)| *s == side).collect();
        text.push_str(header);
        text.push('\n');
        for ((package, _), features) in &on_side {
            let (name, version) = package.split_once(" v").unwrap_or((package, "*"));
            let twice = on_side
                .iter()
                .filter(|((p, _), _)| p.split_once(" v").map(|(n, _)| n) == Some(name))
                .count()
                > 1;
            let key = if twice {
                format!(
                    "{name}-{} = {{ package = \"{name}\", ",
                    version.split('.').next().unwrap_or(version)
                )
            } else {
                format!("{name} = {{ ")
            };
            let features: Vec<String> = features.iter().map(|f| format!("\"{f}\"")).collect();
            text.push_str(&format!(
                "{key}version = \"{version}\", default-features = false, features = [{}] }}\n",
                features.join(", ")
            ));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_units_are_proc_macros_build_dependencies_and_what_they_use() {
        let tree = "\
convkit-core v0.1.0 (/x)|
├── num-traits v0.2.19|std
│   [build-dependencies]
│   └── autocfg v1.5.1|
├── serde v1.0.229|derive,std
│   └── serde_derive v1.0.229 (proc-macro)|default
│       └── syn v2.0.119|full
└── libm v0.2.16|
";
        let sets = parse_tree(tree);
        let side = |p: &str| {
            sets.keys()
                .find(|(name, _)| name == p)
                .map(|(_, s)| *s)
                .unwrap()
        };
        assert_eq!(side("num-traits v0.2.19"), Side::Target);
        assert_eq!(side("autocfg v1.5.1"), Side::Host);
        assert_eq!(side("serde_derive v1.0.229"), Side::Host);
        assert_eq!(side("syn v2.0.119"), Side::Host);
        // a sibling after a build dependency's parent is on the target side again
        assert_eq!(side("libm v0.2.16"), Side::Target);
        let serde = &sets[&("serde v1.0.229".to_string(), Side::Target)];
        assert_eq!(
            serde.iter().next().unwrap(),
            &BTreeSet::from(["derive".to_string(), "std".to_string()])
        );
    }

    /// Fails when an engine or a dependency update made an external crate resolve differently
    /// in one single-feature build than in the test build: that build would compile the crate
    /// and everything above it once more. The message carries the lines for
    /// xtask/check-pins/Cargo.toml.
    #[test]
    fn the_pins_make_every_single_feature_build_reuse_the_test_build() {
        let missing = missing().unwrap();
        assert!(
            missing.is_empty(),
            "xtask/check-pins/Cargo.toml is out of date; add these lines (`cargo xtask pins` prints them):\n{}",
            manifest_lines(&missing)
        );
    }
}
