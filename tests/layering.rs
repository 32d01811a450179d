//! The server's modules import one way: a module may use the ones below it in [`LAYERS`] (and
//! its neighbours in the same layer, as long as no cycle forms), never one above it. Each
//! top-level module's `crate::x` references are read from its files under `src/` (the binaries
//! in `src/bin` and `#[cfg(test)]` modules left out), so a new import that points up, or a
//! cycle, fails here with the files that make it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The layers, lowest first. A module may import from its own layer and the ones before it.
const LAYERS: &[&[&str]] = &[
    // Plain types, and the generated wire code.
    &["domain"],
    &["proto"],
    &["config"],
    // Cron expressions and which occurrences a due schedule creates.
    &["cron"],
    // Helpers over the config.
    &["error_text"],
    &["telemetry"],
    // The `worker` binary's file (the worker itself is the `coordinator-worker` crate).
    &["worker_config"],
    &["tls"],
    &["auth"],
    &["metrics"],
    &["store"],
    &["registry"],
    // Helpers over the store and the registry.
    &["fleet"],
    &["events"],
    &["wakeups"],
    &["batch"],
    &["scheduler", "sweeper", "pruner"],
    &["core"],
    // The adapters.
    &["grpc", "rest", "http"],
    &["app"],
];

/// Who imports what: module -> (imported module -> a file that does it).
type Graph = BTreeMap<String, BTreeMap<String, PathBuf>>;

#[test]
fn modules_import_only_downwards_and_without_cycles() {
    // At run time, so the same binary can check another checkout.
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    let src = Path::new(&root).join("src");
    let graph = graph_of(&src);
    assert!(graph.len() > 10, "read only {} modules under {}", graph.len(), src.display());

    let mut problems = Vec::new();
    let layer_of: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(i, l)| l.iter().map(move |m| (*m, i))).collect();
    for module in graph.keys() {
        if !layer_of.contains_key(module.as_str()) {
            problems.push(format!("module `{module}` has no layer: add it to LAYERS in tests/layering.rs"));
        }
    }
    for (module, imports) in &graph {
        let Some(&mine) = layer_of.get(module.as_str()) else { continue };
        for (imported, file) in imports {
            match layer_of.get(imported.as_str()) {
                Some(&theirs) if theirs > mine => problems.push(format!(
                    "`{module}` imports `{imported}`, a layer above it ({}): move what it needs down, \
                     or the code that needs it up",
                    file.display()
                )),
                _ => {}
            }
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} in {}", w[0], w[1], graph[&w[0]][&w[1]].display()))
            .collect();
        problems.push(format!("import cycle: {} ({})", cycle.join(" -> "), edges.join("; ")));
    }
    assert!(problems.is_empty(), "the module graph breaks its layering:\n  {}", problems.join("\n  "));
}

/// The parser on the forms the code uses.
#[test]
fn references_are_read_from_paths_groups_and_outside_test_modules() {
    let text = r#"
        use crate::{a, b::{c, d::E}, f::g as h};
        use crate::i::J;
        pub use crate::k;
        fn x() { crate::l::m(); $crate::n::o(); }
        /// Links count too: [`crate::p`].
        #[cfg(test)]
        mod tests {
            use crate::q;
            fn y() { let _ = { crate::r::s() }; }
        }
        fn z() { crate::t::u(); }
    "#;
    let got = references(text);
    let want: BTreeSet<String> =
        ["a", "b", "f", "i", "k", "l", "p", "t"].iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want);
}

/// The graph of every module under `src`, but for the binaries and the crate root.
fn graph_of(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a path").as_os_str().to_string_lossy().into_owned();
        if first == "bin" || first == "lib.rs" || first == "main.rs" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_owned();
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let imports = graph.entry(module.clone()).or_default();
        for r in references(&text) {
            if r != module {
                imports.entry(r).or_insert_with(|| Path::new("src").join(rel));
            }
        }
    }
    graph
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names as `crate::x`, with `#[cfg(test)]` modules left out.
fn references(text: &str) -> BTreeSet<String> {
    let text = without_test_modules(text);
    let bytes = text.as_bytes();
    let mut found = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("crate::") {
        let start = from + at;
        from = start + "crate::".len();
        let before = start.checked_sub(1).map(|i| bytes[i]);
        if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$') {
            continue;
        }
        if bytes.get(from) == Some(&b'{') {
            let end = matching_brace(bytes, from);
            found.extend(group_heads(&text[from + 1..end]));
            from = end;
        } else {
            let name = ident_at(&text[from..]);
            if !name.is_empty() {
                found.insert(name.to_owned());
            }
        }
    }
    found
}

/// The first path segment of each item of a `{...}` group (its inside given).
fn group_heads(inside: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in inside.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && depth == 0 && !c.is_whitespace() => {
                item_start = false;
                let name = ident_at(&inside[i..]);
                if !name.is_empty() && name != "self" {
                    heads.push(name.to_owned());
                }
            }
            _ => {}
        }
    }
    heads
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The index of the `}` that closes the `{` at `open`.
fn matching_brace(bytes: &[u8], open: usize) -> usize {
    let mut depth = 0;
    for (i, b) in bytes.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    bytes.len()
}

/// `text` without the bodies of `#[cfg(test)] mod x { ... }`.
fn without_test_modules(text: &str) -> String {
    const ATTR: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(at) = text[pos..].find(ATTR).map(|i| pos + i) {
        out.push_str(&text[pos..at]);
        let after = at + ATTR.len();
        // The item under the attribute: a `mod` with a body is left out whole.
        let item = text[after..].trim_start();
        let item = item.strip_prefix("pub ").unwrap_or(item);
        let open = item.strip_prefix("mod ").and_then(|m| {
            m.find(['{', ';']).filter(|&b| m.as_bytes()[b] == b'{').map(|b| text.len() - m.len() + b)
        });
        pos = match open {
            Some(open) => (matching_brace(text.as_bytes(), open) + 1).min(text.len()),
            None => after,
        };
    }
    out.push_str(&text[pos..]);
    out
}

/// A cycle as a path that starts and ends at the same module, if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        m: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(m.to_owned(), Mark::Open);
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flat_map(|i| i.keys()) {
            if !graph.contains_key(next) {
                continue;
            }
            match marks.get(next) {
                Some(Mark::Open) => {
                    let from = path.iter().position(|p| p == next).expect("on the path");
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(c) = visit(graph, next, marks, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        marks.insert(m.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in graph.keys() {
        if !marks.contains_key(m)
            && let Some(c) = visit(graph, m, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}
