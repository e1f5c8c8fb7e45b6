//! ARCHITECTURE.md's codemap says what each module may call; this test holds the code to
//! it. For every module of the library it collects the `crate::<module>` paths the module's
//! files use (and `hsmkeyd::<module>` in src/main.rs), and fails on any module the codemap's
//! "may call" column does not list for it, and on any cycle among the modules.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The library's top-level modules, from `pub mod` lines of src/lib.rs.
fn modules() -> BTreeSet<String> {
    fs::read_to_string(Path::new(ROOT).join("src/lib.rs"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

/// Module -> the modules its codemap row allows ("every module" allows all).
fn allowed(known: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let doc = fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let mut map = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `src/")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let path = cells[0].trim_start_matches("| ").trim_matches('`');
        let name = path
            .trim_start_matches("src/")
            .trim_end_matches('/')
            .trim_end_matches(".rs")
            .to_string();
        let may_call = cells.last().unwrap().trim_end_matches(" |");
        let calls: BTreeSet<String> = if may_call.contains("every module") {
            known.clone()
        } else {
            may_call
                .split('`')
                .skip(1)
                .step_by(2)
                .map(|t| t.split("::").next().unwrap().to_string())
                .filter(|t| known.contains(t))
                .collect()
        };
        let _ = map.insert(name, calls);
    }
    map
}

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.is_file() && p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// Module names used as `<prefix><module>` in these files.
fn uses(files: &[PathBuf], prefix: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for f in files {
        let text = fs::read_to_string(f).unwrap();
        for (i, _) in text.match_indices(prefix) {
            let rest = &text[i + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if known.contains(&name) {
                let _ = found.insert(name);
            }
        }
    }
    found
}

/// The module graph as the code has it.
fn actual(known: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(ROOT).join("src");
    let mut graph = BTreeMap::new();
    for m in known {
        let mut files = Vec::new();
        rust_files(&src.join(m), &mut files);
        rust_files(&src.join(format!("{m}.rs")), &mut files);
        assert!(!files.is_empty(), "no source for module {m}");
        let mut deps = uses(&files, "crate::", known);
        let _ = deps.remove(m);
        let _ = graph.insert(m.clone(), deps);
    }
    let main = vec![src.join("main.rs")];
    let _ = graph.insert("main".to_string(), uses(&main, "hsmkeyd::", known));
    graph
}

#[test]
fn every_module_calls_only_what_the_codemap_allows() {
    let known = modules();
    let allowed = allowed(&known);
    let mut wrong = Vec::new();
    for (m, deps) in actual(&known) {
        let Some(ok) = allowed.get(&m) else {
            wrong.push(format!("{m}: no row in ARCHITECTURE.md's codemap"));
            continue;
        };
        for d in deps.difference(ok) {
            wrong.push(format!(
                "{m} uses {d}, which its codemap row does not allow"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_modules_have_no_cycle() {
    let known = modules();
    let graph = actual(&known);
    // Depth-first search with colours: a grey node met again closes a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap();
                let mut cycle = path[from..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        let _ = state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, state, path) {
                return Some(c);
            }
        }
        let _ = path.pop();
        let _ = state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut state, &mut Vec::new()) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
}
