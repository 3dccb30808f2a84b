//! The module structure keeps two rules of its own (issue 14), checked here so that a change which
//! breaks one fails the ordinary test suite instead of waiting for a reviewer to notice:
//!
//! - no module in `engine/src`, `harness/src` (or `grammar/src`) names a module that names it
//!   back, directly or around a circle;
//! - no source file there is over 600 lines (its inline `#[cfg(test)]` module counts; files under
//!   a `tests/` directory and `tests.rs` files, which only hold unit tests, do not).
//!
//! The scan is plain text, std only:
//!
//! - Each `.rs` file is a module: `lib.rs`/`main.rs` is the crate root, `a/mod.rs` or `a.rs` is
//!   `a`, `a/b.rs` is `a::b`. A `main.rs` beside a `lib.rs` is a crate of its own that reaches
//!   the library only by its crate name, so it has no edges.
//! - File A has an edge to file B when A names a path into B, in a `use` tree (grouped, nested,
//!   `pub use`, multi-line) or inline in code. A path counts when it starts with `crate::`,
//!   `super::`, `self::`, or with a name bound in that file to one of the crate's modules: a child
//!   declared by `mod x;`, or a module imported by `use` (`use crate::a::b;` then `b::f()`).
//!   Inline `mod x { .. }` blocks shift what `self` and `super` mean, as they do for rustc.
//! - A path resolves to the deepest existing module file it names: `crate::policy::compile::X`
//!   is `policy/compile.rs`, `crate::policy::Policy` is `policy/mod.rs`. `mod x;` itself is not
//!   an edge, a file naming itself is ignored, and the crate root is a module like any other.
//! - Comments, string, byte-string, raw-string and char literals are skipped; `$crate` and
//!   `pub(in path)` are not edges.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

/// Edges between files (indexes into the file list), each with the paths that made it.
type Edges = BTreeMap<(usize, usize), BTreeSet<String>>;

/// A path as written, with the module it was written in (file module plus inline `mod` blocks).
struct Reference {
    segments: Vec<String>,
    written_in: Vec<String>,
    /// The name a `use` binds (its last segment or its `as` alias); `None` for inline paths.
    binds: Option<String>,
}

fn module_path(rel: &str) -> Vec<String> {
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") || parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Identifiers, `::`, and single punctuation characters, with comments and literals removed.
fn tokens(text: &str) -> Vec<String> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(&c, i + 1);
        } else if ch == '\'' {
            if next == Some('\\') {
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1; // a lifetime or label
            }
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let prefix = matches!(word.as_str(), "r" | "b" | "br" | "c" | "cr");
            if prefix && c.get(i) == Some(&'"') {
                i = if word.contains('r') { skip_raw(&c, i, 0) } else { skip_string(&c, i + 1) };
            } else if prefix && word.contains('r') && c.get(i) == Some(&'#') {
                let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                if c.get(i + hashes) == Some(&'"') {
                    i = skip_raw(&c, i + hashes, hashes);
                } else if word == "r" {
                    i += 1; // a raw identifier: the word follows as its own token
                } else {
                    out.push(word);
                }
            } else {
                out.push(word);
            }
        } else if ch == ':' && next == Some(':') {
            out.push("::".to_string());
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(ch.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The index just past a `"..."` whose opening quote is before `i`.
fn skip_string(c: &[char], mut i: usize) -> usize {
    while i < c.len() && c[i] != '"' {
        i += if c[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// The index just past a raw string whose opening quote is at `quote`, closed by `"` + `hashes` `#`.
fn skip_raw(c: &[char], quote: usize, hashes: usize) -> usize {
    let mut i = quote + 1;
    while i < c.len() {
        if c[i] == '"' && c[i + 1..].iter().take(hashes).filter(|&&h| h == '#').count() == hashes {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

fn is_ident(t: &str) -> bool {
    t.chars().next().is_some_and(|ch| ch.is_alphabetic() || ch == '_')
}

/// Expands one use tree starting at `*i` into full paths, each with the name it binds.
fn use_tree(t: &[String], i: &mut usize, prefix: Vec<String>, out: &mut Vec<(Vec<String>, Option<String>)>) {
    let mut segs = prefix;
    if t.get(*i).is_some_and(|x| x == "::") {
        *i += 1;
    }
    while let Some(tok) = t.get(*i) {
        if tok == "{" {
            *i += 1;
            while let Some(tok) = t.get(*i) {
                match tok.as_str() {
                    "}" => {
                        *i += 1;
                        break;
                    }
                    "," => *i += 1,
                    ";" => return,
                    _ => use_tree(t, i, segs.clone(), out),
                }
            }
            return;
        }
        if tok == "*" {
            *i += 1;
            segs.push("*".to_string());
            out.push((segs, None));
            return;
        }
        if !is_ident(tok) {
            return;
        }
        segs.push(tok.clone());
        *i += 1;
        match t.get(*i).map(String::as_str) {
            Some("::") => *i += 1,
            Some("as") => {
                let alias = t.get(*i + 1).cloned();
                *i += 2;
                out.push((segs, alias));
                return;
            }
            _ => {
                let bound = if segs.last().is_some_and(|s| s == "self") { segs.len() - 2 } else { segs.len() - 1 };
                let name = segs.get(bound).cloned();
                out.push((segs, name));
                return;
            }
        }
    }
}

/// Every path that could name a module of the crate, and the children declared by `mod x;`.
fn references(file_module: &[String], text: &str) -> (Vec<Reference>, Vec<String>) {
    let t = tokens(text);
    let mut refs = Vec::new();
    let mut children = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < t.len() {
        let written_in: Vec<String> =
            file_module.iter().cloned().chain(inline.iter().map(|(name, _)| name.clone())).collect();
        let prev = if i > 0 { t[i - 1].as_str() } else { "" };
        match t[i].as_str() {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if inline.last().is_some_and(|&(_, d)| d == depth) {
                    inline.pop();
                }
            }
            "mod" if t.get(i + 1).is_some_and(|n| is_ident(n)) => {
                let name = t[i + 1].clone();
                match t.get(i + 2).map(String::as_str) {
                    Some("{") => inline.push((name, depth)),
                    Some(";") if inline.is_empty() => children.push(name),
                    _ => {}
                }
                i += 2;
                continue;
            }
            "use" if prev != "::" => {
                i += 1;
                let mut paths = Vec::new();
                use_tree(&t, &mut i, Vec::new(), &mut paths);
                for (segments, binds) in paths {
                    refs.push(Reference { segments, written_in: written_in.clone(), binds });
                }
                continue;
            }
            tok if is_ident(tok) && t.get(i + 1).is_some_and(|x| x == "::") && !matches!(prev, "::" | "$" | "in") => {
                let mut segments = vec![tok.to_string()];
                i += 1;
                while t.get(i).is_some_and(|x| x == "::") && t.get(i + 1).is_some_and(|n| is_ident(n)) {
                    segments.push(t[i + 1].clone());
                    i += 2;
                }
                refs.push(Reference { segments, written_in, binds: None });
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    (refs, children)
}

/// The absolute module path a reference names, if it starts inside the crate.
fn absolute(r: &Reference, bound: &HashMap<String, Vec<String>>) -> Option<Vec<String>> {
    let (first, rest) = r.segments.split_first()?;
    let mut path = match first.as_str() {
        "crate" => Vec::new(),
        "self" => r.written_in.clone(),
        "super" => r.written_in[..r.written_in.len().saturating_sub(1)].to_vec(),
        name => bound.get(name)?.clone(),
    };
    let mut leading = true;
    for s in rest {
        match s.as_str() {
            "super" if leading => drop(path.pop()),
            "self" | "*" => {}
            _ => {
                leading = false;
                path.push(s.clone());
            }
        }
    }
    Some(path)
}

/// The edges between `files`, given as (path relative to `src/`, text).
fn edges(files: &[(String, String)]) -> Edges {
    let has_lib = files.iter().any(|(rel, _)| rel == "lib.rs");
    let modules: HashMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .filter(|(_, (rel, _))| !(has_lib && rel == "main.rs"))
        .map(|(n, (rel, _))| (module_path(rel), n))
        .collect();
    let deepest = |abs: &[String]| (0..=abs.len()).rev().find_map(|k| modules.get(&abs[..k]).copied());
    let mut out = Edges::new();
    for (from, (rel, text)) in files.iter().enumerate() {
        if has_lib && rel == "main.rs" {
            continue;
        }
        let me = module_path(rel);
        let (refs, children) = references(&me, text);
        let mut bound: HashMap<String, Vec<String>> =
            children.into_iter().map(|c| (c.clone(), me.iter().cloned().chain([c]).collect())).collect();
        // A `use` may bind a module that a later `use` starts from; two rounds settle that.
        for _ in 0..2 {
            for r in refs.iter().filter(|r| r.binds.is_some()) {
                if let Some(abs) = absolute(r, &bound).filter(|abs| modules.contains_key(abs)) {
                    bound.insert(r.binds.clone().unwrap_or_default(), abs);
                }
            }
        }
        for r in &refs {
            let Some(to) = absolute(r, &bound).and_then(|abs| deepest(&abs)) else { continue };
            if to != from {
                let shown = r.segments.strip_suffix(&["self".to_string()]).unwrap_or(&r.segments);
                out.entry((from, to)).or_default().insert(shown.join("::"));
            }
        }
    }
    out
}

/// Strongly connected components with more than one file (Tarjan, iterative).
fn components(n: usize, edges: &Edges) -> Vec<Vec<usize>> {
    let mut succ = vec![Vec::new(); n];
    for &(a, b) in edges.keys() {
        succ[a].push(b);
    }
    let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut next, mut stack, mut out) = (0, Vec::new(), Vec::new());
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work = vec![(root, 0)];
        while let Some(&(v, k)) = work.last() {
            if k == 0 {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = succ[v].get(k) {
                work.last_mut().expect("v is on the work stack").1 += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut scc = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    out.push(scc);
                }
            }
        }
    }
    out
}

/// A shortest circle from the first file of `scc` back to it.
fn shortest_circle(scc: &[usize], edges: &Edges) -> Vec<usize> {
    let start = scc[0];
    let mut came_from: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &(_, w) in edges.range((v, 0)..=(v, usize::MAX)).map(|(k, _)| k) {
            if !scc.contains(&w) {
                continue;
            }
            if w == start {
                let mut path = vec![start, v];
                let mut at = v;
                while at != start {
                    at = came_from[&at];
                    path.push(at);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = came_from.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    vec![start]
}

/// One report per circle: a shortest circle, then every edge inside it with the paths behind it.
fn circles(files: &[(String, String)]) -> Vec<String> {
    let edges = edges(files);
    let name = |n: usize| files[n].0.as_str();
    components(files.len(), &edges)
        .iter()
        .map(|scc| {
            let circle: Vec<&str> = shortest_circle(scc, &edges).into_iter().map(name).collect();
            let mut msg = format!("circle {}", circle.join(" -> "));
            if scc.len() > 2 {
                let all: Vec<&str> = scc.iter().map(|&n| name(n)).collect();
                msg += &format!("\n    files in this tangle: {}", all.join(", "));
            }
            for ((a, b), names) in edges.iter().filter(|((a, b), _)| scc.contains(a) && scc.contains(b)) {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                msg += &format!("\n    {} -> {}: {}", name(*a), name(*b), names.join(", "));
            }
            msg
        })
        .collect()
}

fn too_long(files: &[(String, String)]) -> Vec<String> {
    files
        .iter()
        .filter(|(rel, _)| !rel.split('/').any(|p| p == "tests" || p == "tests.rs"))
        .map(|(rel, text)| (rel, text.lines().count()))
        .filter(|&(_, lines)| lines > MAX_LINES)
        .map(|(rel, lines)| format!("{rel}: {lines} lines (max {MAX_LINES})"))
        .collect()
}

fn read_tree(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("read a source dir").map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let child = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if path.is_dir() {
            read_tree(&path, &child, out);
        } else if name.ends_with(".rs") {
            out.push((child, std::fs::read_to_string(&path).expect("read a source file")));
        }
    }
}

/// Each crate's `src` dir that exists, with its files.
fn crates() -> Vec<(String, Vec<(String, String)>)> {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = engine.parent().expect("engine/ sits in the workspace");
    ["engine", "harness", "grammar"]
        .iter()
        .map(|name| (format!("{name}/src"), root.join(name).join("src")))
        .filter(|(_, dir)| dir.is_dir())
        .map(|(label, dir)| {
            let mut files = Vec::new();
            read_tree(&dir, "", &mut files);
            (label, files)
        })
        .collect()
}

fn check(rule: &str, find: fn(&[(String, String)]) -> Vec<String>) {
    let mut problems = Vec::new();
    for (label, files) in crates() {
        assert!(!files.is_empty(), "{label} has no .rs files");
        problems.extend(find(&files).into_iter().map(|p| format!("{label}: {p}")));
    }
    assert!(problems.is_empty(), "{rule}:\n{}\n", problems.join("\n"));
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    check("modules that import each other, directly or around a circle", circles);
}

#[test]
fn no_source_file_is_over_600_lines() {
    check("source files over the limit", too_long);
}

fn fake(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
}

#[test]
fn the_scan_finds_circles_through_grouped_uses_inline_paths_and_the_root() {
    let files = fake(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub use a::Thing;\n"),
        ("a/mod.rs", "mod inner;\nuse crate::{c::{self, Other}, b};\npub struct Thing;\n"),
        ("a/inner.rs", "pub fn f() { super::super::b::g() }\n"),
        ("b.rs", "pub fn g() {\n    let _ = crate::a::inner::f;\n}\n"),
        ("c.rs", "use crate::Thing;\npub struct Other;\n"),
    ]);
    let found = circles(&files);
    assert_eq!(found.len(), 2, "{found:?}");
    let report = &found.join("\n");
    for part in [
        "lib.rs -> a/mod.rs: a::Thing",
        "a/mod.rs -> c.rs: crate::c, crate::c::Other",
        "a/inner.rs -> b.rs: super::super::b::g",
        "b.rs -> a/inner.rs: crate::a::inner::f",
        "c.rs -> lib.rs: crate::Thing",
    ] {
        assert!(report.contains(part), "{part:?} missing from\n{report}");
    }
}

#[test]
fn the_scan_ignores_comments_strings_test_modules_and_declarations() {
    let files = fake(&[
        ("lib.rs", "pub mod a;\npub mod b;\n//! crate::b::x\n"),
        ("a.rs", "use crate::b::X;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use self::super::X;\n}\n"),
        (
            "b.rs",
            "// crate::a::f\n/* crate::a::f /* nested */ crate::a::f */\n\
             const S: &str = \"crate::a::f \\\" crate::a::f\";\nconst R: &str = r#\"crate::a \"q\" \"#;\n\
             const C: char = '\"'; fn f<'a>(x: &'a str) {}\npub(in crate::a) struct X;\n\
             macro_rules! m { () => { $crate::a::f() } }\n",
        ),
    ]);
    assert_eq!(circles(&files), Vec::<String>::new());
    assert!(edges(&files).keys().all(|&(from, to)| (files[from].0.as_str(), files[to].0.as_str()) == ("a.rs", "b.rs")));
}

#[test]
fn the_scan_follows_modules_bound_by_use_and_counts_long_files() {
    let files = fake(&[
        ("main.rs", "mod p;\nmod q;\n"),
        ("p/mod.rs", "pub mod deep;\n"),
        ("p/deep.rs", "use crate::q;\nfn f() { q::g() }\n"),
        ("q.rs", "use crate::p::deep as d;\npub fn g() { d::h() }\n"),
        ("p/tests.rs", &"\n".repeat(700)),
    ]);
    let found = circles(&files);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("circle p/deep.rs -> q.rs -> p/deep.rs"), "{}", found[0]);
    assert!(too_long(&files).is_empty());
    let long = fake(&[("big.rs", &"x\n".repeat(601)), ("ok.rs", &"x\n".repeat(600))]);
    assert_eq!(too_long(&long), vec!["big.rs: 601 lines (max 600)".to_string()]);
}
