//! The module layering (ARCHITECTURE.md, "Layers"): imports only point down.
//!
//! Reads every non-test source file of `crates/herald/src`, collects the modules each one
//! names (`use crate::…`, `crate::…` paths in code, `super::…`, a child module's path,
//! and in `lib.rs` the bare module names), and checks two things:
//! - between top-level modules, every edge goes to the module's own layer or one below
//!   ([`LAYERS`]), and the edges form no cycle;
//! - between files, ignoring a file's edges to its own ancestors and descendants (a
//!   parent and its children are one module: the parent declares and composes them,
//!   they see its private items), the edges form no cycle either.
//!
//! Comments and `#[cfg(test)]` items are not read: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{repo_root, rust_files};

/// The top-level modules of the crate, bottom layer first. A module may use modules of
/// its own layer (as long as that makes no cycle) and of the layers below, never above.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "vocabulary: names, messages and configuration",
        &["ids", "channel", "close", "config", "sync"],
    ),
    (
        "services: plain Rust that needs no broker",
        &[
            "compose",
            "metrics",
            "telemetry",
            "store",
            "redis",
            "llm",
            "auth",
            "membership",
            "hub",
            "dev",
        ],
    ),
    ("the broker and the one publish path (Publisher)", &["broker"]),
    (
        "what runs over the broker",
        &["limits", "presence", "idempotency", "control", "tasks", "bridge"],
    ),
    ("the state every handler shares", &["app"]),
    ("the HTTP and WebSocket boundary", &["follow", "http", "ws"]),
    ("the crate root: build_state, serve, work, router", &["lib"]),
    ("the command line", &["cli"]),
];

/// A file's module path (`broker::redis::shards`; `lib` for the crate root).
type Module = String;

#[test]
fn imports_only_point_down_the_layers() {
    let graph = Graph::read();
    let layer_of = |module: &str| {
        let top = top_level(module);
        LAYERS.iter().position(|(_, modules)| modules.contains(&top))
    };
    let mut problems = Vec::new();
    let tops: BTreeSet<&str> = graph.edges.keys().map(|module| top_level(module)).collect();
    for top in &tops {
        if layer_of(top).is_none() {
            problems.push(format!(
                "the module `{top}` is in no layer: add it to LAYERS in tests/it/tidy/layers.rs (and to the \
                 layer list in ARCHITECTURE.md)"
            ));
        }
    }
    let mut top_edges: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for (from, targets) in &graph.edges {
        for to in targets {
            let (from_top, to_top) = (top_level(from), top_level(to));
            if from_top == to_top {
                continue;
            }
            top_edges
                .entry(from_top)
                .or_default()
                .entry(to_top)
                .or_insert(from);
            if let (Some(from_layer), Some(to_layer)) = (layer_of(from), layer_of(to)) {
                if to_layer > from_layer {
                    problems.push(format!(
                        "upward edge: `{from}` ({}) uses `{to}` ({}); move what it needs down, or the code \
                         that needs it up",
                        LAYERS[from_layer].0, LAYERS[to_layer].0
                    ));
                }
            }
        }
    }
    let top_graph: BTreeMap<&str, BTreeSet<&str>> = top_edges
        .iter()
        .map(|(from, targets)| (*from, targets.keys().copied().collect()))
        .collect();
    if let Some(cycle) = find_cycle(&top_graph) {
        let via: Vec<String> = cycle
            .windows(2)
            .map(|pair| format!("{} → {} (in {})", pair[0], pair[1], top_edges[pair[0]][pair[1]]))
            .collect();
        problems.push(format!(
            "import cycle between top-level modules: {}",
            via.join(", ")
        ));
    }
    assert!(
        problems.is_empty(),
        "the layering of ARCHITECTURE.md is broken:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn files_import_each_other_without_cycles() {
    let graph = Graph::read();
    let related = |a: &str, b: &str| is_within(a, b) || is_within(b, a);
    let files: BTreeMap<&str, BTreeSet<&str>> = graph
        .edges
        .iter()
        .map(|(from, targets)| {
            let targets = targets
                .iter()
                .filter(|to| !related(from, to))
                .map(String::as_str)
                .collect();
            (from.as_str(), targets)
        })
        .collect();
    if let Some(cycle) = find_cycle(&files) {
        panic!(
            "import cycle between files: {}; move what both need into one of them or a third file",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_checker_sees_edges_and_cycles() {
    // The reader and the cycle search on small inputs, so a broken parser cannot pass
    // the two checks above by seeing nothing.
    let modules: BTreeSet<Module> = ["lib", "a", "a::b", "a::c", "d"]
        .iter()
        .map(|m| (*m).to_owned())
        .collect();
    let code =
        "use crate::d::Thing;\nuse super::c::X; // crate::ignored::Y\nfn f() { b::g(); crate::a::c::h() }\n\
                #[cfg(test)]\nmod tests { use crate::lib_only; }\n#[cfg(test)]\nuse crate::d::Other;\n";
    let edges = references("a::b", &strip(code), &modules);
    assert_eq!(
        edges,
        BTreeSet::from(["d".to_owned(), "a::c".to_owned()]),
        "from a::b"
    );
    let in_a = references("a", "mod b;\nfn f() { b::g(); self::c::h(); }", &modules);
    assert_eq!(in_a, BTreeSet::from(["a::b".to_owned(), "a::c".to_owned()]));
    let in_lib = references("lib", "pub mod a;\nfn f() { d::x(); a::b::y(); }", &modules);
    assert_eq!(in_lib, BTreeSet::from(["d".to_owned(), "a::b".to_owned()]));
    let grouped = references(
        "d",
        "use crate::{a::{self, c::Z}, lib_fn};\nuse fred::prelude::X;",
        &modules,
    );
    assert_eq!(
        grouped,
        BTreeSet::from(["a".to_owned(), "a::c".to_owned(), "lib".to_owned()])
    );
    let cyclic = BTreeMap::from([("x", BTreeSet::from(["y"])), ("y", BTreeSet::from(["x"]))]);
    assert_eq!(find_cycle(&cyclic), Some(vec!["x", "y", "x"]));
    let acyclic = BTreeMap::from([("x", BTreeSet::from(["y"])), ("y", BTreeSet::new())]);
    assert_eq!(find_cycle(&acyclic), None);
}

/// Which modules each non-test file names.
struct Graph {
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

impl Graph {
    fn read() -> Self {
        let src = repo_root().join("crates/herald/src");
        let mut texts: BTreeMap<Module, String> = BTreeMap::new();
        for path in rust_files(&src) {
            let Some(module) = module_of(&src, &path) else {
                continue;
            };
            texts.insert(module, std::fs::read_to_string(&path).unwrap());
        }
        // Files declared behind #[cfg(test)] (`tests.rs`, `fuzz.rs`) are tests.
        let mut test_only = BTreeSet::new();
        for (module, text) in &texts {
            for name in test_modules(text) {
                test_only.insert(child(module, &name));
            }
        }
        texts.retain(|module, _| !test_only.iter().any(|test| is_within(module, test)));
        let modules: BTreeSet<Module> = texts.keys().cloned().collect();
        assert!(
            modules.len() > 40 && modules.contains("broker::redis"),
            "found only {} modules under crates/herald/src; is the path right?",
            modules.len()
        );
        let edges = texts
            .iter()
            .map(|(module, text)| (module.clone(), references(module, &strip(text), &modules)))
            .collect();
        Self { edges }
    }
}

/// `src/broker/redis.rs` → `broker::redis`; `None` for the binary's `main.rs`.
fn module_of(src: &Path, path: &Path) -> Option<Module> {
    let relative = path.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [only] if only == "main" => None,
        parts => Some(parts.join("::")),
    }
}

fn top_level(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn child(parent: &str, name: &str) -> Module {
    if parent == "lib" {
        name.to_owned()
    } else {
        format!("{parent}::{name}")
    }
}

/// Whether `module` is `ancestor` or inside it (the crate root contains everything).
fn is_within(module: &str, ancestor: &str) -> bool {
    ancestor == "lib" || module == ancestor || module.starts_with(&format!("{ancestor}::"))
}

/// The names of the modules `text` declares behind `#[cfg(test)]` (`mod tests;`).
fn test_modules(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut after_cfg_test = false;
    for line in text.lines().map(str::trim) {
        if line == "#[cfg(test)]" {
            after_cfg_test = true;
            continue;
        }
        if after_cfg_test {
            if let Some(name) = line.strip_prefix("mod ").and_then(|rest| rest.strip_suffix(';')) {
                names.push(name.trim().to_owned());
            }
        }
        after_cfg_test = line.starts_with("#[");
    }
    names
}

/// `text` without comments and without the items behind `#[cfg(test)]`.
fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let code = match line.find("//") {
            Some(idx) => &line[..idx],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    let mut kept = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(idx) = rest.find("#[cfg(test)]") {
        kept.push_str(&rest[..idx]);
        rest = skip_item(&rest[idx + "#[cfg(test)]".len()..]);
    }
    kept.push_str(rest);
    kept
}

/// `text` after the item it starts with: up to its `;`, or its balanced `{ … }` block.
fn skip_item(text: &str) -> &str {
    let mut depth = 0usize;
    for (idx, c) in text.char_indices() {
        match c {
            ';' if depth == 0 => return &text[idx + 1..],
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return &text[idx + 1..];
                }
            }
            _ => {}
        }
    }
    ""
}

/// The modules (other than itself) that `module`'s code names, each resolved to the
/// longest path prefix that is a file of the crate.
fn references(module: &str, code: &str, modules: &BTreeSet<Module>) -> BTreeSet<Module> {
    let mut found = BTreeSet::new();
    for path in paths(code) {
        if let Some(target) = resolve(module, &path, modules) {
            if target != module {
                found.insert(target);
            }
        }
    }
    found
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every path of two or more segments in `code` (`a::b::c`), with `use` groups
/// expanded (`a::{b, c::d}` gives `a::b` and `a::c::d`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    let mut idx = 0;
    while idx < bytes.len() {
        let starts_path = is_ident(bytes[idx])
            && !(idx > 0 && (is_ident(bytes[idx - 1]) || bytes[idx - 1] == b':'))
            && !bytes[idx].is_ascii_digit();
        if !starts_path {
            idx += 1;
            continue;
        }
        let (segments, end) = read_path(code, idx);
        idx = end;
        if code[end..].starts_with("::{") {
            idx = expand_group(code, end + 3, &segments, &mut found);
        } else if segments.len() >= 2 {
            found.push(segments);
        }
    }
    found
}

/// Adds the paths of the `use` group starting at `start` (just after its `{`) under
/// `prefix`, nested groups too; returns where the group ends.
fn expand_group(code: &str, start: usize, prefix: &[String], found: &mut Vec<Vec<String>>) -> usize {
    let end = matching_brace(code, start);
    let mut offset = start;
    for item in split_top_level(&code[start..end]) {
        let item_start = offset + (item.len() - item.trim_start().len());
        offset += item.len() + 1;
        if item.trim().is_empty() || !is_ident(code.as_bytes()[item_start]) {
            continue;
        }
        let (inner, inner_end) = read_path(code, item_start);
        let mut full = prefix.to_vec();
        full.extend(inner.into_iter().filter(|segment| segment != "self"));
        if code[inner_end..].starts_with("::{") {
            expand_group(code, inner_end + 3, &full, found);
        } else {
            found.push(full);
        }
    }
    end
}

/// The segments of the path starting at `start`, and where it ends.
fn read_path(code: &str, start: usize) -> (Vec<String>, usize) {
    let bytes = code.as_bytes();
    let mut idx = start;
    let mut segments = Vec::new();
    loop {
        let seg_start = idx;
        while idx < bytes.len() && is_ident(bytes[idx]) {
            idx += 1;
        }
        segments.push(code[seg_start..idx].to_owned());
        if code[idx..].starts_with("::") && idx + 2 < bytes.len() && is_ident(bytes[idx + 2]) {
            idx += 2;
        } else {
            return (segments, idx);
        }
    }
}

/// The index of the `}` closing the group that starts at `start` (just after its `{`).
fn matching_brace(code: &str, start: usize) -> usize {
    let mut depth = 1usize;
    for (idx, c) in code[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return start + idx;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// `text` split at the commas outside braces.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut from) = (0usize, 0);
    for (idx, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&text[from..idx]);
                from = idx + 1;
            }
            _ => {}
        }
    }
    items.push(&text[from..]);
    items
}

/// The file of the crate `path` (as written in `module`) names, if it names one:
/// `crate::…`, `super::…`, `self::…`, or a child module's (in `lib.rs`, a top-level
/// module's) name.
fn resolve(module: &str, path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let (mut full, rest): (Vec<String>, &[String]) = match path[0].as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (module_parts(module), &path[1..]),
        "super" => {
            let mut parts = module_parts(module);
            let supers = path.iter().take_while(|segment| *segment == "super").count();
            for _ in 0..supers {
                parts.pop();
            }
            (parts, &path[supers..])
        }
        first if modules.contains(&child(module, first)) => (module_parts(module), path),
        _ => return None,
    };
    full.extend(rest.iter().cloned());
    let target = (1..=full.len())
        .rev()
        .map(|len| full[..len].join("::"))
        .find(|candidate| modules.contains(candidate))
        .unwrap_or_else(|| "lib".to_owned());
    Some(target)
}

fn module_parts(module: &str) -> Vec<String> {
    if module == "lib" {
        Vec::new()
    } else {
        module.split("::").map(str::to_owned).collect()
    }
}

/// A cycle in `graph` as its nodes, the first repeated at the end; `None` if acyclic.
fn find_cycle<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node);
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node, Mark::Open);
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(node, graph, &mut marks, &mut stack) {
            return Some(cycle);
        }
    }
    None
}
