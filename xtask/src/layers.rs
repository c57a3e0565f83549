//! The agent crate's top-level modules and which of them import which (`crate::<module>` in a
//! `use`, a path, or a macro's tokens), and the circles among them: a module that reaches
//! itself through others cannot be read, tested or split out alone (docs/architecture.md).
//! The modules are also ordered in layers (`xtask/layers.txt`, drawn in docs/architecture.md):
//! a module imports its own layer or the ones below, never one above. `agent` and `config` are
//! the wiring and may import every stage; `lib.rs` and `main.rs` are left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Modules that wire the others together and so may import any of them: `agent` starts the
/// stages, `config` composes their sections.
pub const WIRING: &[&str] = &["agent", "config"];

/// Where one module imports another: the file and line of the first such import.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    pub file: PathBuf,
    pub line: usize,
}

/// `from` imports `to`, first at `site`.
pub type Graph = BTreeMap<String, BTreeMap<String, Site>>;

#[derive(Debug, thiserror::Error)]
pub enum LayersError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Parse { path: PathBuf, source: syn::Error },
}

/// The graph of the crate whose sources are under `src` (its `lib.rs` beside the modules).
pub fn graph(src: &Path) -> Result<Graph, LayersError> {
    let modules = top_level_modules(src)?;
    let mut graph = Graph::new();
    for module in &modules {
        graph.entry(module.clone()).or_default();
        for file in module_files(src, module)? {
            let text = std::fs::read_to_string(&file).map_err(|source| LayersError::Read {
                path: file.clone(),
                source,
            })?;
            let ast = syn::parse_file(&text).map_err(|source| LayersError::Parse {
                path: file.clone(),
                source,
            })?;
            let mut found = CratePaths::default();
            found.visit_file(&ast);
            for (to, line) in found.0 {
                if &to == module || !modules.contains(&to) {
                    continue;
                }
                let site = Site {
                    file: file.strip_prefix(src).unwrap_or(&file).to_path_buf(),
                    line,
                };
                let edges = graph.entry(module.clone()).or_default();
                match edges.get(&to) {
                    Some(old) if *old <= site => {}
                    _ => {
                        edges.insert(to, site);
                    }
                }
            }
        }
    }
    Ok(graph)
}

/// Modules that reach each other (a strongly connected component of more than one), and one
/// cycle through them with the import behind each step.
#[derive(Debug)]
pub struct Circle {
    pub modules: BTreeSet<String>,
    pub cycle: Vec<(String, String, Site)>,
}

/// Every circle among the modules other than [`WIRING`].
pub fn circles(graph: &Graph) -> Vec<Circle> {
    let nodes: Vec<&String> = graph
        .keys()
        .filter(|m| !WIRING.contains(&m.as_str()))
        .collect();
    let edges = |m: &String| -> Vec<&String> {
        graph[m]
            .keys()
            .filter(|t| !WIRING.contains(&t.as_str()) && graph.contains_key(*t))
            .collect()
    };
    let mut out = Vec::new();
    for component in strongly_connected(&nodes, &edges) {
        if component.len() < 2 {
            continue;
        }
        let start = component
            .iter()
            .next()
            .expect("a component has a module")
            .clone();
        let cycle = cycle_through(graph, &component, &start);
        out.push(Circle {
            modules: component,
            cycle,
        });
    }
    out
}

/// Tarjan's algorithm, iterating in name order so the answer is stable.
fn strongly_connected<'a>(
    nodes: &[&'a String],
    edges: &dyn Fn(&String) -> Vec<&'a String>,
) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        index: BTreeMap<&'a String, usize>,
        low: BTreeMap<&'a String, usize>,
        stack: Vec<&'a String>,
        on_stack: BTreeSet<&'a String>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(v: &'a String, edges: &dyn Fn(&String) -> Vec<&'a String>, s: &mut State<'a>) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in edges(v) {
            if !s.index.contains_key(w) {
                visit(w, edges, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.insert(w.clone());
                if w == v {
                    break;
                }
            }
            s.out.push(component);
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in nodes {
        if !s.index.contains_key(*v) {
            visit(v, edges, &mut s);
        }
    }
    s.out
}

/// A shortest cycle from `start` back to itself, inside the component.
fn cycle_through(
    graph: &Graph,
    component: &BTreeSet<String>,
    start: &String,
) -> Vec<(String, String, Site)> {
    // Breadth-first from `start`; the first edge back to it closes the cycle.
    let mut parent: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut last = None;
    'search: while let Some(m) = queue.pop_front() {
        for to in graph[m].keys().filter(|t| component.contains(*t)) {
            if to == start {
                last = Some(m);
                break 'search;
            }
            if !parent.contains_key(to) {
                parent.insert(to, m);
                queue.push_back(to);
            }
        }
    }
    let mut path = vec![start];
    let mut at = last.expect("a strongly connected component has a cycle");
    let mut back = vec![at];
    while at != start {
        at = parent[at];
        back.push(at);
    }
    back.pop();
    back.reverse();
    path.extend(back);
    path.push(start);
    path.windows(2)
        .map(|w| (w[0].clone(), w[1].clone(), graph[w[0]][w[1]].clone()))
        .collect()
}

/// The circles not inside one of the `known` knots (lines of space-separated modules; `#`
/// starts a comment), each as `modules: cycle`.
pub fn unknown_circles(graph: &Graph, known: &str) -> Vec<String> {
    let known: Vec<BTreeSet<&str>> = known
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    circles(graph)
        .into_iter()
        .filter(|c| {
            !known
                .iter()
                .any(|k| c.modules.iter().all(|m| k.contains(m.as_str())))
        })
        .map(|c| {
            // The cycle through a module outside the knot it overlaps most: the new import.
            let knot = known
                .iter()
                .max_by_key(|k| c.modules.iter().filter(|m| k.contains(m.as_str())).count());
            let start = c
                .modules
                .iter()
                .find(|m| knot.is_none_or(|k| !k.contains(m.as_str())))
                .unwrap_or(&c.cycle[0].0);
            let cycle = cycle_through(graph, &c.modules, start);
            let modules: Vec<&str> = c.modules.iter().map(String::as_str).collect();
            format!("{}: {}", modules.join(" "), describe(&cycle))
        })
        .collect()
}

/// The layers, bottom first: one per line, `name: module module …`; `#` starts a comment.
pub fn parse_layers(text: &str) -> Result<Vec<(String, BTreeSet<String>)>, String> {
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, modules) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected `layer: module …`", n + 1))?;
        let modules: BTreeSet<String> = modules.split_whitespace().map(String::from).collect();
        if let Some(m) = modules
            .iter()
            .find(|m| out.iter().any(|(_, l)| l.contains(*m)))
        {
            return Err(format!("line {}: {m} is in two layers", n + 1));
        }
        out.push((name.trim().to_string(), modules));
    }
    Ok(out)
}

/// What breaks the layering: a module in no layer, a layer naming a module that does not
/// exist, and every import of a module from a layer above the importer's.
pub fn layer_violations(graph: &Graph, layers: &[(String, BTreeSet<String>)]) -> Vec<String> {
    let layer_of = |m: &str| layers.iter().position(|(_, l)| l.contains(m));
    let mut out = Vec::new();
    for (from, imports) in graph {
        let Some(low) = layer_of(from) else {
            out.push(format!("{from} is in no layer (xtask/layers.txt)"));
            continue;
        };
        for (to, site) in imports {
            if let Some(high) = layer_of(to).filter(|&l| l > low) {
                out.push(format!(
                    "{from} ({}) imports {to} ({}, a layer above it): {}:{} uses crate::{to}",
                    layers[low].0,
                    layers[high].0,
                    site.file.display(),
                    site.line
                ));
            }
        }
    }
    for (name, modules) in layers {
        for m in modules.iter().filter(|m| !graph.contains_key(*m)) {
            out.push(format!(
                "layer {name} names {m}, which is no module of the crate"
            ));
        }
    }
    out
}

/// One cycle of a circle: `a → b → a (a.rs:3 uses crate::b; b/x.rs:9 uses crate::a)`.
pub fn describe(cycle: &[(String, String, Site)]) -> String {
    let mut names: Vec<&str> = cycle.iter().map(|(from, _, _)| from.as_str()).collect();
    names.push(&cycle[0].0);
    let sites: Vec<String> = cycle
        .iter()
        .map(|(_, to, site)| format!("{}:{} uses crate::{to}", site.file.display(), site.line))
        .collect();
    format!("{} ({})", names.join(" → "), sites.join("; "))
}

fn top_level_modules(src: &Path) -> Result<BTreeSet<String>, LayersError> {
    let read = |path: &Path| {
        std::fs::read_dir(path).map_err(|source| LayersError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut out = BTreeSet::new();
    for entry in read(src)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if path.join("mod.rs").exists() {
                out.insert(name);
            }
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "lib" && stem != "main" {
                out.insert(stem.to_string());
            }
        }
    }
    Ok(out)
}

fn module_files(src: &Path, module: &str) -> Result<Vec<PathBuf>, LayersError> {
    let mut out = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        out.push(file);
    }
    let dir = src.join(module);
    if dir.is_dir() {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|source| LayersError::Read {
                path: d.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let p = entry.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The first segment after each `crate::`, with its line.
#[derive(Default)]
struct CratePaths(Vec<(String, usize)>);

impl CratePaths {
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, t) in trees.iter().enumerate() {
            match t {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" => {
                    if let [TokenTree::Punct(a), TokenTree::Punct(b), TokenTree::Ident(next), ..] =
                        &trees[i + 1..]
                    {
                        if a.as_char() == ':' && b.as_char() == ':' {
                            self.0.push((next.to_string(), next.span().start().line));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn use_tree(&mut self, tree: &syn::UseTree, line: usize) {
        match tree {
            syn::UseTree::Path(p) => self.0.push((p.ident.to_string(), line)),
            syn::UseTree::Name(n) => self.0.push((n.ident.to_string(), line)),
            syn::UseTree::Rename(r) => self.0.push((r.ident.to_string(), line)),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(t, line);
                }
            }
            syn::UseTree::Glob(_) => {}
        }
    }
}

impl<'ast> Visit<'ast> for CratePaths {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(p) = &u.tree {
            if p.ident == "crate" {
                self.use_tree(&p.tree, p.ident.span().start().line);
            }
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter();
        if let (Some(first), Some(second)) = (segments.next(), segments.next()) {
            if first.ident == "crate" {
                self.0
                    .push((second.ident.to_string(), second.ident.span().start().line));
            }
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn finds_imports_in_uses_paths_and_macros() {
        let dir = crate_of(&[
            ("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
            ("a.rs", "use crate::{b::X, c};\nfn f() {}"),
            ("b/mod.rs", "mod inner;"),
            ("b/inner.rs", "fn f() { let _ = crate::d::y(); }"),
            ("c.rs", "fn f() { tracing::info!(\"{}\", crate::d::Z); }"),
            ("d.rs", "// crate::a in a comment is no import\nfn f() {}"),
        ]);
        let g = graph(dir.path()).unwrap();
        let to = |m: &str| g[m].keys().cloned().collect::<Vec<_>>();
        assert_eq!(to("a"), ["b", "c"]);
        assert_eq!(to("b"), ["d"]);
        assert_eq!(g["b"]["d"].file, Path::new("b/inner.rs"));
        assert_eq!(to("c"), ["d"]);
        assert!(to("d").is_empty());
        assert!(circles(&g).is_empty());
    }

    #[test]
    fn a_circle_is_named_with_the_imports_that_make_it() {
        let dir = crate_of(&[
            ("lib.rs", ""),
            ("agent.rs", "use crate::{a, b, c};"),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", "\n\nuse crate::c::Y;"),
            ("c.rs", "fn f() { crate::a::g(); }"),
            ("d.rs", "use crate::agent::run;"),
        ]);
        let g = graph(dir.path()).unwrap();
        let found = circles(&g);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].modules,
            BTreeSet::from(["a", "b", "c"].map(String::from))
        );
        assert_eq!(
            describe(&found[0].cycle),
            "a → b → c → a (a.rs:1 uses crate::b; b.rs:3 uses crate::c; c.rs:1 uses crate::a)"
        );
    }

    #[test]
    fn a_known_knot_passes_and_a_circle_reaching_out_of_it_fails() {
        let dir = crate_of(&[
            ("lib.rs", ""),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", "use crate::a::Y;"),
            ("c.rs", "fn f() {}"),
        ]);
        let known = "# today\na b\n";
        assert!(unknown_circles(&graph(dir.path()).unwrap(), known).is_empty());
        std::fs::write(dir.path().join("c.rs"), "use crate::a::Z;").unwrap();
        std::fs::write(dir.path().join("b.rs"), "use crate::{a::Y, c};").unwrap();
        assert_eq!(
            unknown_circles(&graph(dir.path()).unwrap(), known),
            ["a b c: c → a → b → c (c.rs:1 uses crate::a; a.rs:1 uses crate::b; b.rs:1 uses crate::c)"]
        );
    }

    /// The agent crate as it is: no circle beyond the knots recorded in known-circles.txt, and
    /// one import from a module outside them back into the knot makes one.
    #[test]
    fn the_agent_crate_passes_and_fails_on_a_new_circle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let known = include_str!("../known-circles.txt");
        let g = graph(&src).unwrap();
        assert_eq!(unknown_circles(&g, known), Vec::<String>::new());
        let mut worse = g.clone();
        let site = Site {
            file: PathBuf::from("health.rs"),
            line: 1,
        };
        worse
            .get_mut("health")
            .unwrap()
            .insert("track".into(), site);
        let found = unknown_circles(&worse, known);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("health.rs:1 uses crate::track"),
            "{found:?}"
        );
    }

    #[test]
    fn an_import_from_a_layer_above_is_named() {
        let dir = crate_of(&[
            ("lib.rs", ""),
            ("base.rs", "fn f() {}"),
            ("stage.rs", "use crate::base::X;"),
            ("top.rs", "use crate::{base, stage};"),
        ]);
        let layers =
            parse_layers("# bottom first\nfoundations: base\nstages: stage\nexport: top\n")
                .unwrap();
        let g = graph(dir.path()).unwrap();
        assert!(layer_violations(&g, &layers).is_empty());
        std::fs::write(dir.path().join("base.rs"), "\nuse crate::top::Y;").unwrap();
        std::fs::write(dir.path().join("new.rs"), "fn f() {}").unwrap();
        let g = graph(dir.path()).unwrap();
        assert_eq!(
            layer_violations(&g, &layers),
            [
                "base (foundations) imports top (export, a layer above it): base.rs:2 uses crate::top",
                "new is in no layer (xtask/layers.txt)",
            ]
        );
        assert!(parse_layers("a: x\nb: x")
            .unwrap_err()
            .contains("x is in two layers"));
        assert!(parse_layers("a x").is_err());
    }

    /// The agent crate obeys its layers, and one import pointing up breaks them.
    #[test]
    fn the_agent_crate_obeys_its_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let layers = parse_layers(include_str!("../layers.txt")).unwrap();
        let mut g = graph(&src).unwrap();
        assert_eq!(layer_violations(&g, &layers), Vec::<String>::new());
        g.get_mut("queue").unwrap().insert(
            "track".into(),
            Site {
                file: PathBuf::from("queue.rs"),
                line: 1,
            },
        );
        let found = layer_violations(&g, &layers);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("queue.rs:1 uses crate::track"),
            "{found:?}"
        );
    }

    /// docs/architecture.md draws the same layers as the check enforces.
    #[test]
    fn the_architecture_doc_lists_the_layers() {
        let doc = include_str!("../../docs/architecture.md");
        for line in include_str!("../layers.txt").lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            assert!(doc.contains(line), "docs/architecture.md lacks `{line}`");
        }
    }

    #[test]
    fn the_wiring_module_makes_no_circle() {
        let dir = crate_of(&[
            ("lib.rs", ""),
            ("agent.rs", "use crate::a;"),
            ("a.rs", "use crate::agent::Start;"),
        ]);
        assert!(circles(&graph(dir.path()).unwrap()).is_empty());
    }
}
