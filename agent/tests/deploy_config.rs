//! The ConfigMap's config.toml in deploy/manifests/inferscope.yaml (the Helm chart's defaults,
//! rendered by `cargo xtask manifests`) loads with the agent's own loader: a key the agent
//! does not know fails here, not on a cluster's nodes.

use std::path::Path;

use inferscope::config::{Config, Overrides};

/// The `config.toml: |` block scalar of the ConfigMap, de-indented.
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest.lines();
    let header = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("config.toml: |"))
        .expect("no config.toml in the ConfigMap");
    let key_indent = header.len() - header.trim_start().len();
    let mut body = Vec::new();
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && indent <= key_indent {
            break;
        }
        body.push(line);
    }
    let strip = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(strip..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn load(toml: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(Some(&path), &Vec::new(), &Overrides::default()).map_err(|e| e.to_string())
}

#[test]
fn configmap_config_loads() {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/inferscope.yaml"),
    )
    .unwrap();
    let toml = configmap_toml(&manifest);
    assert!(toml.contains("proc_root"), "{toml}");
    let config = load(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(config.proc_root, Path::new("/host/proc"));
    // The loader is strict: the same file with an unknown key is refused.
    let bad = toml.replace("[probes]", "[probes]\nno_such_key = 1");
    assert!(load(&bad).is_err());
}
