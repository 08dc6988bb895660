//! The shape of the code, checked: the top-level modules of `trainer/src` use each other
//! without a cycle (a `crate::x` reference is an edge; unit-test modules aside), no Rust file
//! of the workspace is over 700 lines and no function over 120 (DESIGN.md: files under ~600
//! lines, functions under ~100; these are the hard limits).
//!
//! The source is read as text, as rustfmt leaves it: a function ends at the first line that is
//! its own indentation followed by `}`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 700;
const MAX_FUNCTION_LINES: usize = 120;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file below `dir`, skipping build output.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() && name != "target" && !name.starts_with('.') {
                pending.push(path);
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The text of a file without its `#[cfg(test)] mod name { ... }` blocks.
fn without_test_modules(text: &str) -> String {
    let mut kept = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            let next = lines.next().unwrap_or("");
            if next.trim_start().starts_with("mod ") && next.trim_end().ends_with('{') {
                let indent = &next[..next.len() - next.trim_start().len()];
                let end = format!("{indent}}}");
                for inner in lines.by_ref() {
                    if inner == end {
                        break;
                    }
                }
            } else if !next.trim_start().starts_with("mod ") {
                kept.push(next);
            }
            continue;
        }
        kept.push(line);
    }
    kept.join("\n")
}

/// The top-level module a file of `trainer/src` belongs to (None for lib.rs and the binary).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).unwrap().components().next()?;
    let name = first.as_os_str().to_string_lossy();
    match name.strip_suffix(".rs").unwrap_or(&name) {
        "lib" | "main" | "bin" => None,
        module => Some(module.to_string()),
    }
}

/// Names `text` refers to as `crate::name` or inside `crate::{a, b::c}` (comments aside).
fn crate_references(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            names.insert(ident(rest));
            continue;
        };
        // The first name of each comma-separated item at the group's own depth.
        let (mut depth, mut item_start) = (0, true);
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    names.insert(ident(&group[j..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    names.remove("");
    names
}

/// `(from, to)` edges between top-level modules of trainer/src, with a file that makes each.
fn module_edges() -> BTreeMap<(String, String), PathBuf> {
    let src = workspace().join("trainer/src");
    let files = rust_files(&src);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = without_test_modules(&std::fs::read_to_string(file).unwrap());
        for to in crate_references(&text) {
            if modules.contains(&to) && to != from {
                edges.entry((from.clone(), to)).or_insert(file.clone());
            }
        }
    }
    edges
}

#[test]
fn top_level_modules_have_no_cycle() {
    let edges = module_edges();
    assert!(
        edges.contains_key(&("train".into(), "step".into())),
        "the edge finder sees train -> step: {edges:?}"
    );
    // Remove modules that use nothing left (the bottom layer) and modules nothing left uses
    // (the top), layer after layer; whatever cannot be removed lies on a cycle.
    let mut left: BTreeSet<String> = edges
        .keys()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    loop {
        let live = |a: &String, b: &String| left.contains(a) && left.contains(b);
        let removable: Vec<String> = left
            .iter()
            .filter(|m| {
                let uses = edges.keys().any(|(a, b)| a == *m && live(a, b));
                let used = edges.keys().any(|(a, b)| b == *m && live(a, b));
                !uses || !used
            })
            .cloned()
            .collect();
        if removable.is_empty() {
            break;
        }
        for m in removable {
            left.remove(&m);
        }
    }
    let on_cycles: Vec<String> = edges
        .iter()
        .filter(|((a, b), _)| left.contains(a) && left.contains(b))
        .map(|((a, b), file)| format!("{a} -> {b} ({})", file.display()))
        .collect();
    assert!(
        on_cycles.is_empty(),
        "module cycle among {left:?}:\n  {}",
        on_cycles.join("\n  ")
    );
}

/// Functions of `text` longer than the limit, as `name (lines)`.
fn long_functions(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let code = code
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ")
            .trim_start_matches("const ")
            .trim_start_matches("async ")
            .trim_start_matches("unsafe ");
        let Some(rest) = code.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with('}') || line.trim_end().ends_with(';') {
            continue; // a one-line function or a declaration
        }
        let end = format!("{indent}}}");
        if let Some(length) = lines[i..].iter().position(|l| *l == end) {
            if length + 1 > MAX_FUNCTION_LINES {
                let name: String = rest
                    .chars()
                    .take_while(|c| *c != '(' && *c != '<')
                    .collect();
                long.push(format!("{name} ({} lines)", length + 1));
            }
        }
    }
    long
}

#[test]
fn no_file_or_function_is_too_long() {
    let root = workspace();
    let mut problems = Vec::new();
    let mut functions_seen = 0;
    for dir in ["trainer", "launcher", "tests"] {
        for file in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines = text.lines().count();
            if lines > MAX_FILE_LINES {
                problems.push(format!("{}: {lines} lines", file.display()));
            }
            functions_seen += text.matches("fn ").count();
            for function in long_functions(&text) {
                problems.push(format!("{}: fn {function}", file.display()));
            }
        }
    }
    assert!(
        functions_seen > 500,
        "read the sources: {functions_seen} functions"
    );
    assert!(
        problems.is_empty(),
        "over {MAX_FILE_LINES} lines per file or {MAX_FUNCTION_LINES} per function:\n  {}",
        problems.join("\n  ")
    );
}

/// The length check itself finds a long function and passes over short ones.
#[test]
fn the_length_check_measures_functions() {
    let body: String = (0..MAX_FUNCTION_LINES)
        .map(|i| format!("    let x{i} = {i};\n"))
        .collect();
    let long = format!("pub fn long() {{\n{body}}}\nfn short() {{\n    1\n}}\nfn one() {{}}\n");
    assert_eq!(
        long_functions(&long),
        [format!("long ({} lines)", MAX_FUNCTION_LINES + 2)]
    );
}
