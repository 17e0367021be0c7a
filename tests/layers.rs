//! The layering of `src/` (the table in `src/lib.rs`), held against the code: every `crate::X`
//! path in a module must name a module of a lower layer, so no import circle can come back.
//! Reads the sources only; no containerd needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module and its layer: a module may import only from lower layers.
const LAYERS: &[(&str, u32)] = &[
    ("vocab", 0),
    ("grpc", 0),
    ("errors", 0),
    ("proto", 0),
    ("small_file", 0),
    ("http_server", 0),
    ("atomic_file", 1),
    ("registry", 1),
    ("config", 2),
    ("logging", 3),
    ("metrics", 3),
    ("jobs", 3),
    ("schedule", 4),
    ("upstream", 4),
    ("mirror", 5),
    ("pull", 6),
    ("health", 7),
    ("frontdoor", 7),
    ("watchdog", 7),
    ("prewarm", 7),
    ("api", 8),
    ("status", 9),
    ("preflight", 9),
    ("fuzzing", 9),
    ("daemon", 10),
    ("cli", 11),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module {module:?} has no layer in tests/layers.rs: add it"))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules named by `crate::X` paths in `text`, comments left out.
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                panic!("a grouped `crate::{{..}}` import: name each module on its own line");
            }
            found.push(name);
        }
    }
    found
}

#[test]
fn every_import_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let from = layer(&top);
        for to in imports(&std::fs::read_to_string(&file).unwrap()) {
            if to == top {
                continue;
            }
            seen += 1;
            if layer(&to) >= from {
                wrong.entry(rel.display().to_string()).or_default().push(to);
            }
        }
    }
    // The reader must see the crate's imports at all, or the test would pass on nothing.
    assert!(seen > 100, "only {seen} imports read");
    assert!(
        wrong.is_empty(),
        "imports that do not point to a lower layer (file -> modules): {wrong:#?}"
    );
}

#[test]
fn the_reader_sees_paths_and_skips_comments() {
    let text = "use crate::vocab::Class;\n// crate::daemon\nlet x = crate::jobs::Board::new(); // crate::cli\n";
    assert_eq!(imports(text), ["vocab", "jobs"]);
}
