//! The crate's layers, checked: data flows one way, from the command line to
//! the kernel, so a module imports only from the layers below its own.
//!
//! Read from the sources (the `crate::` paths of every non-test line), so a
//! new import that runs back up fails `cargo test` with the file and the path.

/// Top-level modules from the top down; modules of one rank import none of
/// each other.
const RANKS: &[&[&str]] = &[
    // Parses the command line and dispatches.
    &["cli"],
    // One file per subcommand, each owning its arguments.
    &["commands"],
    // Exit statuses, decided from the subsystems' typed errors.
    &["error"],
    // The owner of the served set: the agent's loop.
    &["agent"],
    // The settings the agent runs with; the configuration files.
    &["config"],
    // Readers of the datapath's state: /metrics and the agent's log; the
    // Tempo ring check.
    &["telemetry", "ring"],
    // The subsystems: kernel objects and maps, which namespaces to serve,
    // flow records.
    &["bpf", "discovery", "flows"],
    // The kernel facade: system calls, namespaces, sock_diag, cgroups.
    &["sys"],
];

fn rank(module: &str) -> Option<usize> {
    RANKS.iter().position(|r| r.contains(&module))
}

/// The top-level modules a source names through `crate::`, outside its tests.
fn imports(source: &str) -> Vec<String> {
    // Tests sit at the end of a file; what they import is theirs.
    let code = ["#[cfg(test)]\nmod ", "#[cfg(test)]\npub(crate) mod "]
        .iter()
        .filter_map(|m| source.find(m))
        .min()
        .map_or(source, |end| &source[..end]);
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c}`: the first segment of each item at depth 0.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

#[test]
fn every_import_runs_down_the_layers() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|m| m.trim_end_matches(".rs"))
            .expect("a module name");
        if matches!(module, "lib" | "main" | "layers") {
            continue;
        }
        let Some(own) = rank(module) else {
            wrong.push(format!("{module}: in no layer of RANKS"));
            continue;
        };
        let source = std::fs::read_to_string(file).expect("readable");
        for import in imports(&source) {
            if import == module {
                continue;
            }
            checked += 1;
            match rank(&import) {
                Some(r) if r > own => {}
                Some(_) => wrong.push(format!(
                    "{}: imports crate::{import}, which is not below `{module}`",
                    relative.display()
                )),
                None => wrong.push(format!(
                    "{}: imports crate::{import}, in no layer of RANKS",
                    relative.display()
                )),
            }
        }
    }
    // The reader must see the imports, or this test passes on nothing.
    assert!(checked > 100, "only {checked} imports found");
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_finds_grouped_and_plain_imports_and_skips_tests() {
    let source =
        "use crate::{bpf::{Redirect, sockops}, sys};\nfn f() { crate::flows::log::x(); }\n\
                  #[cfg(test)]\nmod tests {\n    use crate::cli;\n}\n";
    assert_eq!(imports(source), ["bpf", "sys", "flows"]);
}
