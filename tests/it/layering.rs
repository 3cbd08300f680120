//! The layering rule of ARCHITECTURE.md, checked: no import cycle between files under
//! `src/`, nor between top-level modules.
//!
//! Imports are read from the text: every `use crate::…` item (grouped `use crate::{a,
//! b::{c, d}}` forms included, over several lines) and every `crate::a::b` path written
//! inline in code. Each path names the deepest module file it reaches
//! (`crate::connectors::scim::settings::Scim2Settings` → `src/connectors/scim/settings.rs`).
//! Relative paths (`super::`, `self::`) are not read: the code base imports across files
//! with `crate::` paths only, and uses `super::*` only in a file's own test module.
//!
//! The one exception the rule makes: a parent module and its own children may import
//! each other (a cycle made only of a `mod.rs` and files directly under it).
//!
//! It also checks the layers ARCHITECTURE.md states: a top-level module imports only
//! modules of lower layers (the numbered list in ARCHITECTURE.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path (`["connectors", "scim"]`) and the file that defines it.
type Modules = BTreeMap<Vec<String>, String>;
/// File → files it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level modules by layer, lowest first, read from the numbered list under
/// "## Layering" in ARCHITECTURE.md (the module names in backticks before the dash), so
/// the document and this test cannot drift apart.
fn layers() -> Vec<Vec<String>> {
    let architecture =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let section = architecture
        .split("## Layering")
        .nth(1)
        .expect("ARCHITECTURE.md has a Layering section");
    let section = section.split("\n## ").next().unwrap();
    let layers: Vec<Vec<String>> = section
        .lines()
        .filter_map(|line| {
            let (number, rest) = line.split_once(". ")?;
            number.parse::<u32>().ok()?;
            let names = rest.split(" — ").next().unwrap();
            Some(names.split('`').skip(1).step_by(2).map(str::to_string).collect())
        })
        .collect();
    assert!(layers.len() >= 5, "ARCHITECTURE.md lists too few layers: {layers:?}");
    layers
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = file_graph(&read_sources(&root));
    let layers = layers();
    let layer = |module: &str| layers.iter().position(|layer| layer.iter().any(|name| name == module));
    let mut problems = BTreeSet::new();
    for (file, imports) in &graph {
        let Some(from) = module_path(file).first().cloned() else {
            continue; // lib.rs only declares the modules.
        };
        let Some(from_layer) = layer(&from) else {
            problems.insert(format!(
                "`{from}` has no layer: add it to the layers in ARCHITECTURE.md"
            ));
            continue;
        };
        for import in imports {
            let Some(to) = module_path(import).first().cloned() else {
                continue;
            };
            if to != from && layer(&to).is_none_or(|to_layer| to_layer >= from_layer) {
                problems.insert(format!("{file} imports {import}: `{from}` may not import `{to}`"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering:\n  {}",
        problems.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn no_import_cycle_between_files_or_top_level_modules() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = read_sources(&root);
    assert!(sources.len() > 20, "found only {} files under src/", sources.len());
    // The reading works: known imports are seen.
    let graph = file_graph(&sources);
    for (file, import) in [
        ("settings.rs", "connectors/settings.rs"),
        ("connectors/settings.rs", "connectors/scim/settings.rs"),
        ("pipeline/process.rs", "dead_letter.rs"),
    ] {
        assert!(graph[file].contains(import), "{file} should import {import}: {graph:?}");
    }
    let problems = cycles(&sources);
    assert!(problems.is_empty(), "import cycles:\n  {}", problems.join("\n  "));
}

#[test]
fn the_check_finds_cycles_through_grouped_and_inline_paths() {
    let sources: BTreeMap<String, String> = [
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::{\n    b::{inner::Thing, self},\n    x,\n};\n"),
        ("b/mod.rs", "pub mod inner;\n"),
        ("b/inner.rs", "fn f() { crate::c::run(); }\n"),
        // A comment naming crate::a does not count; the inline path below does.
        (
            "c.rs",
            "// crate::b::inner\npub fn run() { let _ = crate::a::VALUE; }\n",
        ),
    ]
    .into_iter()
    .map(|(path, text)| (path.to_string(), text.to_string()))
    .collect();
    let problems = cycles(&sources);
    assert!(
        problems.iter().any(|problem| problem.contains("files")
            && problem.contains("a.rs")
            && problem.contains("b/inner.rs")
            && problem.contains("c.rs")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|problem| problem.contains("top-level modules")),
        "{problems:?}"
    );

    // A parent and its own children may import each other.
    let family: BTreeMap<String, String> = [
        ("lib.rs", "pub mod p;\n"),
        ("p/mod.rs", "pub mod child;\nuse crate::p::child::Made;\n"),
        ("p/child.rs", "use crate::p::Shared;\n"),
    ]
    .into_iter()
    .map(|(path, text)| (path.to_string(), text.to_string()))
    .collect();
    assert!(cycles(&family).is_empty(), "{:?}", cycles(&family));
}

/// Every `.rs` file under `root`, by its path relative to `root`, except `main.rs`
/// (the binary, which imports the library by name).
fn read_sources(root: &Path) -> BTreeMap<String, String> {
    let mut sources = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let relative = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                if relative != "main.rs" {
                    sources.insert(relative, std::fs::read_to_string(&path).unwrap());
                }
            }
        }
    }
    sources
}

/// Every cycle found, described: between files first, then between top-level modules.
fn cycles(sources: &BTreeMap<String, String>) -> Vec<String> {
    let files = file_graph(sources);
    let mut problems = Vec::new();
    for component in strongly_connected(&files) {
        if !is_one_family(&component) {
            problems.push(format!("between files: {}", describe(&files, &component)));
        }
    }
    let top_level = |file: &str| module_path(file).first().cloned().unwrap_or_else(|| "crate".into());
    let mut top = Graph::new();
    for (file, targets) in &files {
        let from = top_level(file);
        let edges = top.entry(from.clone()).or_default();
        edges.extend(targets.iter().map(|target| top_level(target)).filter(|to| *to != from));
    }
    for component in strongly_connected(&top) {
        problems.push(format!("between top-level modules: {}", describe(&top, &component)));
    }
    problems
}

/// Which files each file imports.
fn file_graph(sources: &BTreeMap<String, String>) -> Graph {
    let modules: Modules = sources.keys().map(|file| (module_path(file), file.clone())).collect();
    let mut files = Graph::new();
    for (file, text) in sources {
        let targets = files.entry(file.clone()).or_default();
        for path in crate_paths(&strip_comments(text)) {
            if let Some(target) = resolve(&modules, &path) {
                if target != file {
                    targets.insert(target.clone());
                }
            }
        }
    }
    files
}

/// `connectors/scim/mod.rs` → `["connectors", "scim"]`; `lib.rs` → `[]`.
fn module_path(file: &str) -> Vec<String> {
    let without_extension = file.trim_end_matches(".rs");
    let mut segments: Vec<String> = without_extension.split('/').map(str::to_string).collect();
    if matches!(segments.last().map(String::as_str), Some("mod" | "lib")) {
        segments.pop();
    }
    segments
}

/// The file of the deepest module `path` reaches, if any.
fn resolve<'a>(modules: &'a Modules, path: &[String]) -> Option<&'a String> {
    (1..=path.len()).rev().find_map(|length| modules.get(&path[..length]))
}

/// Removes `//` comments (doc comments included) and string literals' contents enough
/// that a path written in prose does not count.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(start) if !line[..start].contains('"') => &line[..start],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::…` path in `code`, with `use` groups expanded.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(start) = rest.find("crate::") {
        let preceded_by_identifier = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|character| character.is_alphanumeric() || character == '_');
        let tail = &rest[start + "crate::".len()..];
        if preceded_by_identifier {
            rest = tail;
            continue;
        }
        let (tree, consumed) = take_tree(tail);
        expand(&tree, Vec::new(), &mut paths);
        rest = &tail[consumed..];
    }
    paths
}

/// The text of a path or use tree at the start of `text`: identifiers, `::`, and one
/// balanced `{…}` group per level. Returns it and how many bytes it took.
fn take_tree(text: &str) -> (String, usize) {
    let mut depth = 0usize;
    for (index, character) in text.char_indices() {
        match character {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            character if character.is_alphanumeric() || character == '_' || character == ':' => {}
            _ => return (text[..index].to_string(), index),
        }
    }
    (text.to_string(), text.len())
}

/// Expands `a::{b::{c, d}, e}` (relative to `prefix`) into whole paths.
fn expand(tree: &str, prefix: Vec<String>, paths: &mut Vec<Vec<String>>) {
    let tree = tree.trim().trim_end_matches("::");
    let (head, group) = match tree.find('{') {
        Some(open) => (
            &tree[..open],
            Some(&tree[open + 1..tree.rfind('}').unwrap_or(tree.len())]),
        ),
        None => (tree, None),
    };
    let mut path = prefix;
    path.extend(
        head.split("::")
            .map(str::trim)
            .filter(|segment| !segment.is_empty() && *segment != "self" && *segment != "*")
            .map(|segment| segment.split_whitespace().next().unwrap_or(segment).to_string()),
    );
    match group {
        None => paths.push(path),
        Some(group) => {
            paths.push(path.clone());
            for item in split_top_level(group) {
                expand(item, path.clone(), paths);
            }
        }
    }
}

/// Splits `b::{c, d}, e` at the commas outside braces.
fn split_top_level(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (index, character) in group.char_indices() {
        match character {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items.into_iter().filter(|item| !item.trim().is_empty()).collect()
}

/// A cycle made only of a parent module and files directly under it.
fn is_one_family(component: &[String]) -> bool {
    component.iter().any(|parent| {
        let parent_path = module_path(parent);
        component.iter().all(|member| {
            let member_path = module_path(member);
            member == parent || (member_path.len() == parent_path.len() + 1 && member_path.starts_with(&parent_path))
        })
    })
}

/// The strongly connected components with more than one member (Tarjan's algorithm).
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<String>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let next = state.index.len();
        state.index.insert(node, next);
        state.low.insert(node, next);
        state.stack.push(node);
        state.on_stack.insert(node);
        for target in state.graph.get(node).into_iter().flatten() {
            let target = target.as_str();
            if !state.index.contains_key(target) {
                visit(state, target);
                let low = state.low[node].min(state.low[target]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(target) {
                let low = state.low[node].min(state.index[target]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member.to_string());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.components.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.components
}

/// One concrete cycle through the component, e.g. `a.rs → b.rs → a.rs`.
fn describe(graph: &Graph, component: &[String]) -> String {
    let members: BTreeSet<&String> = component.iter().collect();
    let start = &component[0];
    // Breadth-first from `start` inside the component, back to `start`.
    let mut previous: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for target in graph.get(node).into_iter().flatten() {
            if !members.contains(target) {
                continue;
            }
            if target == start {
                let mut cycle = vec![start.as_str()];
                let mut current = node;
                while current != start {
                    cycle.push(current.as_str());
                    current = previous[current];
                }
                cycle.push(start.as_str());
                cycle.reverse();
                return cycle.join(" → ");
            }
            if !previous.contains_key(target) {
                previous.insert(target, node);
                queue.push_back(target);
            }
        }
    }
    component.join(", ")
}
