//! The documentation holds together: every relative link in the README, `docs/` and
//! `deploy/README.md` names a file that exists and, with a `#fragment`, a heading or an
//! `<a id>` in it; and the README stays a page a newcomer reads in a few minutes, with the
//! details in `docs/`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// More than this and the README is turning back into the manual `docs/` holds.
const README_MAX_LINES: usize = 200;

fn documents() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut files = vec![root.join("README.md"), root.join("deploy/README.md")];
    for krate in ["proto", "worker", "coordctl"] {
        files.push(root.join("crates").join(krate).join("README.md"));
    }
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = &str> {
    let mut in_code = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            return false;
        }
        !in_code
    })
}

/// The targets of the Markdown links `[text](target)` in `text`, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a link may name in `text`: heading slugs and `<a id="...">`.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in prose(text) {
        if let Some(h) = line.strip_prefix('#') {
            out.insert(slug(h.trim_start_matches('#')));
        }
        let mut rest = line;
        while let Some(i) = rest.find("<a id=\"") {
            rest = &rest[i + 7..];
            if let Some(end) = rest.find('"') {
                out.insert(rest[..end].to_owned());
            }
        }
    }
    out
}

#[test]
fn every_relative_link_names_a_file_and_an_anchor_that_exist() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let dir = doc.parent().unwrap();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() { doc.clone() } else { dir.join(path) };
            let name = format!("{} -> {target}", doc.strip_prefix(ROOT).unwrap().display());
            if !file.exists() {
                broken.push(format!("{name}: no such file"));
                continue;
            }
            if let Some(fragment) = fragment {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&text).contains(fragment) {
                    broken.push(format!("{name}: no heading or <a id> \"{fragment}\""));
                }
            }
        }
    }
    assert!(checked > 20, "the documents link to each other ({checked} links found)");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_stays_short_and_points_at_the_details() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= README_MAX_LINES, "README.md has {lines} lines; move details into docs/");
    for doc in ["operations", "configuration", "security", "writing-a-worker", "api", "benchmarks", "testing"]
    {
        assert!(readme.contains(&format!("docs/{doc}.md")), "README.md links docs/{doc}.md");
    }
}

/// The worker SDK's README shows a complete prover in under 40 lines, and it is the example CI
/// builds (`crates/worker/examples/prover.rs`), so the README's code compiles.
#[test]
fn the_sdk_readme_prover_is_the_example_that_builds() {
    let root = Path::new(ROOT).join("crates/worker");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("```rust\n").expect("the SDK README has a Rust example") + "```rust\n".len();
    let code = &readme[start..start + readme[start..].find("```").unwrap()];
    let lines = code.lines().count();
    assert!(lines < 40, "the SDK README's prover has {lines} lines");
    let example = std::fs::read_to_string(root.join("examples/prover.rs")).unwrap();
    let body: String = example
        .lines()
        .skip_while(|l| l.starts_with("//!") || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(body, code, "crates/worker/examples/prover.rs differs from the SDK README's example");
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug(" Running several replicas"), "running-several-replicas");
    assert_eq!(slug("REST API (`/api/v1/`)"), "rest-api-apiv1");
    assert_eq!(slug("The `exec` handler: an external prover"), "the-exec-handler-an-external-prover");
}
