//! Module cycles between the files of a crate: file A uses an item defined in file B and B,
//! directly or around a circle, uses one defined in A. A path is followed through `pub use`
//! re-exports to the file that defines the item; a re-export is a use only where the file's
//! own code names the item too. The crate root (`lib.rs`, `main.rs`) is the crate's index,
//! not a node, and test modules are left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result};

/// A module: its path from the crate root, `/`-separated (`train/fit`); the root is `""`.
type Module = String;

/// The cycles among the modules under `src`, each as its modules sorted; none is good.
pub fn module_cycles(src: &Path) -> Result<Vec<Vec<Module>>> {
    let mut sources = BTreeMap::new();
    read_modules(src, src, &mut sources)?;
    let mut reexports: HashMap<(Module, String), Vec<String>> = HashMap::new();
    let mut uses: BTreeMap<Module, Vec<Vec<String>>> = BTreeMap::new();
    for (module, code) in &sources {
        let mut used = Vec::new();
        let statements = use_statements(code);
        // How often a name appears outside `use` statements and `mod` declarations.
        let named_in_code = |name: &str| {
            let in_uses: usize = statements.iter().map(|(_, t)| word_count(t, name)).sum();
            let in_mods = (code.lines())
                .filter(|l| {
                    l.trim_start()
                        .trim_start_matches("pub ")
                        .starts_with("mod ")
                })
                .map(|l| word_count(l, name))
                .sum::<usize>();
            word_count(code, name) > in_uses + in_mods
        };
        for (public, tree) in &statements {
            for path in expand(tree) {
                let Some(absolute) = absolute(module, &path, &sources) else {
                    continue;
                };
                let name = absolute.last().cloned().unwrap_or_default();
                if *public {
                    reexports.insert((module.clone(), name.clone()), absolute.clone());
                    if !named_in_code(&name) {
                        continue;
                    }
                }
                used.push(absolute);
            }
        }
        for path in inline_paths(code) {
            used.extend(absolute(module, &path, &sources));
        }
        uses.insert(module.clone(), used);
    }
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, paths) in &uses {
        let targets = edges.entry(module.clone()).or_default();
        for path in paths {
            let target = defining_module(path, &sources, &reexports, 0);
            if target != *module && !target.is_empty() && !module.is_empty() {
                targets.insert(target);
            }
        }
    }
    Ok(strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .collect())
}

fn read_modules(root: &Path, dir: &Path, out: &mut BTreeMap<Module, String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            read_modules(root, &path, out)?;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(root)?.with_extension("");
        let mut module = relative.to_string_lossy().replace('\\', "/");
        if let Some(parent) = module.strip_suffix("/mod") {
            module = parent.to_string();
        }
        if module == "lib" || module == "main" {
            module.clear();
        }
        let text = std::fs::read_to_string(&path)?;
        out.insert(module, code_of(&text));
    }
    Ok(())
}

/// `text` without comments and without its test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn word_count(code: &str, word: &str) -> usize {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| *w == word)
        .count()
}

/// Each `use` statement's tree, and whether it is `pub`.
fn use_statements(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let before_word = before.trim_end();
        let public = ["pub", "pub(crate)", "pub(super)"]
            .iter()
            .any(|p| before_word.ends_with(p));
        let starts_statement = public
            || (before_word.chars().last()).is_none_or(|c| matches!(c, ';' | '{' | '}' | ']'));
        let word_start = before
            .chars()
            .last()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        let end = rest[at..].find(';').map_or(rest.len(), |e| at + e);
        if starts_statement && word_start {
            out.push((
                public,
                rest[at + 4..end]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            ));
        }
        rest = &rest[(at + 4).min(rest.len())..];
    }
    out
}

/// The paths of a use tree: `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree);
        return vec![segments(path)];
    };
    let prefix = segments(tree[..open].trim_end_matches("::"));
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    let mut out = Vec::new();
    for item in items.into_iter().map(str::trim).filter(|i| !i.is_empty()) {
        for path in expand(item) {
            let mut full = prefix.clone();
            full.extend(path.into_iter().filter(|s| s != "self"));
            out.push(full);
        }
    }
    out
}

/// A path's segments: `a::b` → `a`, `b`.
fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// `crate::a::b` and `super::a` paths written in code.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for anchor in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(anchor) {
            let glued = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            if !glued {
                out.push(segments(tail[..end].trim_end_matches(':')));
            }
            rest = &rest[at + anchor.len()..];
        }
    }
    out
}

/// `path` (as written in `module`) from the crate root, or `None` for another crate's.
fn absolute(
    module: &str,
    path: &[String],
    sources: &BTreeMap<Module, String>,
) -> Option<Vec<String>> {
    let base: Vec<String> = module
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "self" => Some([base, path[1..].to_vec()].concat()),
        "super" => {
            let ups = path.iter().take_while(|s| *s == "super").count();
            let kept = base.len().checked_sub(ups)?;
            Some([base[..kept].to_vec(), path[ups..].to_vec()].concat())
        }
        child => {
            let mut candidate = base.clone();
            candidate.push(child.to_string());
            sources
                .contains_key(&candidate.join("/"))
                .then(|| [base, path.to_vec()].concat())
        }
    }
}

/// The file that defines what `path` names: its longest module prefix, followed through that
/// module's `pub use` of the next segment.
fn defining_module(
    path: &[String],
    sources: &BTreeMap<Module, String>,
    reexports: &HashMap<(Module, String), Vec<String>>,
    depth: usize,
) -> Module {
    for len in (0..=path.len()).rev() {
        let module = path[..len].join("/");
        if !sources.contains_key(&module) {
            continue;
        }
        if let Some(next) = path.get(len) {
            if let Some(target) = reexports.get(&(module.clone(), next.clone())) {
                if depth < 16 && target.as_slice() != path {
                    let full = [target.clone(), path[len + 1..].to_vec()].concat();
                    return defining_module(&full, sources, reexports, depth + 1);
                }
            }
        }
        return module;
    }
    String::new()
}

/// Tarjan's strongly connected components of `edges`, each sorted.
fn strongly_connected(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        components: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        for w in s.edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.stack.contains(&w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            component.sort();
            s.components.push(component);
        }
    }
    let mut state = State {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        components: Vec::new(),
    };
    for v in edges.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.components
}

#[cfg(test)]
mod tests {
    use super::module_cycles;

    #[test]
    fn core_and_xtask_have_no_module_cycles() {
        for src in ["crates/convkit-core/src", "xtask/src"] {
            let cycles = module_cycles(&crate::root().join(src)).unwrap();
            assert!(cycles.is_empty(), "{src}: module cycles {cycles:?}");
        }
    }

    #[test]
    fn a_cycle_through_a_reexport_is_found_and_a_reexport_alone_is_not_one() {
        let dir = tempfile_dir();
        let write = |path: &str, text: &str| {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("lib.rs", "mod a;\nmod b;\nmod c;\npub use a::Alpha;\n");
        write("a.rs", "use crate::b::Beta;\npub struct Alpha(Beta);\n");
        write("b.rs", "pub struct Beta;\n");
        write("c/mod.rs", "mod inner;\npub use inner::Gamma;\n");
        write(
            "c/inner.rs",
            "use crate::Alpha;\npub struct Gamma(Alpha);\n",
        );
        assert!(module_cycles(&dir).unwrap().is_empty());
        // b now uses Alpha through the crate root's re-export: a ↔ b.
        write("b.rs", "pub struct Beta(Box<crate::Alpha>);\n");
        assert_eq!(module_cycles(&dir).unwrap(), vec![vec!["a", "b"]]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("convkit-cycles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
