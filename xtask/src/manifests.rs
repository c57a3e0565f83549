//! `cargo xtask manifests`: deploy/manifests/ is the Helm chart rendered with its default
//! values, and the chart's files/prometheus/ and files/grafana/ hold copies of
//! deploy/prometheus/*.yaml and deploy/grafana/*.json (Helm reads no file outside the chart). Standard library only: the drift test in
//! tests/integration/tests/deploy.rs includes this file and renders the same way.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

/// The chart, relative to the repository root.
pub const CHART: &str = "deploy/helm/inferscope";
/// The rule files the PrometheusRule wraps.
pub const RULES: &str = "deploy/prometheus";
/// Their copies in the chart.
pub const CHART_RULES: &str = "files/prometheus";
/// The Grafana dashboards the chart ships as ConfigMaps.
pub const DASHBOARDS: &str = "deploy/grafana";
/// Their copies in the chart.
pub const CHART_DASHBOARDS: &str = "files/grafana";
/// The rendered plain manifests.
pub const MANIFESTS: &str = "deploy/manifests";

/// Release name and namespace of the plain manifests.
const RELEASE: &str = "inferscope";

/// File name → text.
pub type Files = BTreeMap<String, String>;

/// The `*.yaml` files directly in `dir` (subdirectories such as tests/ are not read).
pub fn read_yaml_dir(dir: &Path) -> Result<Files, String> {
    read_dir_files(dir, ".yaml")
}

/// Makes `files` the `*.yaml` files of `dir`: writes them and removes any other.
pub fn write_yaml_dir(dir: &Path, files: &Files) -> Result<(), String> {
    write_dir_files(dir, ".yaml", files)
}

/// The files directly in `dir` whose names end in `suffix`.
pub fn read_dir_files(dir: &Path, suffix: &str) -> Result<Files, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Files::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_file() && name.ends_with(suffix) {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            files.insert(name.to_string(), text);
        }
    }
    Ok(files)
}

/// Makes `files` the files of `dir` ending in `suffix`: writes them and removes any other.
pub fn write_dir_files(dir: &Path, suffix: &str, files: &Files) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for stale in read_dir_files(dir, suffix)?
        .keys()
        .filter(|n| !files.contains_key(*n))
    {
        let path = dir.join(stale);
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// `helm template` of the chart at `chart`: default values, release and namespace
/// `inferscope`, the Prometheus Operator's API present (ServiceMonitor, PrometheusRule) and
/// the Namespace object included (`kubectl apply` has no --create-namespace), the `helm test`
/// pod left out (a hook, which `kubectl apply` would run as a plain pod). Returns the
/// manifests by file: the Prometheus Operator's kinds each in their own file (they need its
/// CRDs), everything else in inferscope.yaml.
pub fn render(helm: &str, chart: &Path) -> Result<Files, String> {
    let out = Command::new(helm)
        .args(["template", RELEASE])
        .arg(chart)
        .args(["--namespace", RELEASE])
        .args(["--api-versions", "monitoring.coreos.com/v1"])
        .args(["--set", "namespace.create=true"])
        .arg("--skip-tests")
        .output()
        .map_err(|e| format!("{helm}: {e} (run `cargo xtask setup`)"))?;
    if !out.status.success() {
        return Err(format!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| format!("helm output: {e}"))?;
    let mut files = Files::new();
    for doc in text.split("\n---\n").map(|d| d.trim_start_matches("---\n")) {
        if doc.trim().is_empty() {
            continue;
        }
        let kind = doc
            .lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .ok_or_else(|| format!("a rendered document has no kind:\n{doc}"))?;
        let dashboard = doc
            .lines()
            .any(|l| l.starts_with("  name: ") && l.contains("-dashboard-"));
        let name = match kind.trim() {
            "ConfigMap" if dashboard => "grafana-dashboards.yaml",
            "ServiceMonitor" => "servicemonitor.yaml",
            "PodMonitor" => "podmonitor.yaml",
            "PrometheusRule" => "prometheusrule.yaml",
            _ => "inferscope.yaml",
        };
        let file = files
            .entry(name.to_string())
            .or_insert_with(|| header(name));
        file.push_str("---\n");
        file.push_str(doc.trim_end());
        file.push('\n');
    }
    Ok(files)
}

fn header(name: &str) -> String {
    let needs = if name == "grafana-dashboards.yaml" {
        " (for Grafana's dashboard sidecar)".to_string()
    } else if name == "inferscope.yaml" {
        String::new()
    } else {
        " (needs the Prometheus Operator's CRDs)".to_string()
    };
    format!(
        "# Generated by `cargo xtask manifests` from {CHART} (default values, release and\n\
         # namespace \"{RELEASE}\"): change the chart, then regenerate.\n\
         # kubectl apply -f {MANIFESTS}/{name}{needs}\n"
    )
}

/// Where the chart's rule copies live.
pub fn chart_rules(chart: &Path) -> PathBuf {
    chart.join(CHART_RULES)
}

/// Where the chart's dashboard copies live.
pub fn chart_dashboards(chart: &Path) -> PathBuf {
    chart.join(CHART_DASHBOARDS)
}

/// Copies deploy/prometheus/*.yaml and deploy/grafana/*.json into the chart, then renders
/// deploy/manifests/.
pub fn run(root: &Path) -> Result<(), String> {
    let chart = root.join(CHART);
    write_yaml_dir(&chart_rules(&chart), &read_yaml_dir(&root.join(RULES))?)?;
    write_dir_files(
        &chart_dashboards(&chart),
        ".json",
        &read_dir_files(&root.join(DASHBOARDS), ".json")?,
    )?;
    let rendered = render("helm", &chart)?;
    write_yaml_dir(&root.join(MANIFESTS), &rendered)?;
    for name in rendered.keys() {
        eprintln!("xtask manifests: wrote {MANIFESTS}/{name}");
    }
    Ok(())
}
