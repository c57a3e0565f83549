//! deploy/: the manifests and Prometheus rules pass the tools that would reject them in a
//! cluster (promtool, yamllint, kubernetes-validate, all offline), and each check fails on
//! a broken copy. The tools come from `cargo xtask setup` (test part).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Kubernetes version whose schemas kubernetes-validate ships (the DaemonSet uses
/// `appArmorProfile`, 1.30+).
const KUBERNETES_VERSION: &str = "1.30.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the tool; `Err` carries its output.
fn tool(program: &str, args: &[&str], cwd: &Path) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (run `cargo xtask setup`)"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A copy of deploy/ with `file`'s `from` replaced by `to`.
fn broken_copy(file: &str, from: &str, to: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("deploy");
    for rel in [
        "manifests/inferscope.yaml",
        "manifests/servicemonitor.yaml",
        "prometheus/inferscope-rules.yaml",
        "prometheus/tests/inferscope-rules.test.yaml",
    ] {
        let dst = dir.path().join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let mut text = std::fs::read_to_string(src.join(rel)).unwrap();
        if rel == file {
            assert!(text.contains(from), "{rel} has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        std::fs::write(dst, text).unwrap();
    }
    dir
}

fn check_rules(deploy: &Path) -> Result<(), String> {
    tool(
        "promtool",
        &["check", "rules", "prometheus/inferscope-rules.yaml"],
        deploy,
    )
}

fn test_rules(deploy: &Path) -> Result<(), String> {
    tool(
        "promtool",
        &[
            "test",
            "rules",
            "prometheus/tests/inferscope-rules.test.yaml",
        ],
        deploy,
    )
}

fn yamllint(deploy: &Path) -> Result<(), String> {
    tool("yamllint", &["-d", "relaxed", "--no-warnings", "."], deploy)
}

/// Strict schemas for the built-in kinds; the ServiceMonitor (a CRD) has no schema in
/// kubernetes-validate and is only linted (yamllint) and checked for its kind here.
fn validate_manifests(deploy: &Path) -> Result<(), String> {
    tool(
        "kubernetes-validate",
        &[
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            "manifests/inferscope.yaml",
        ],
        deploy,
    )?;
    let sm = std::fs::read_to_string(deploy.join("manifests/servicemonitor.yaml")).unwrap();
    for needed in [
        "apiVersion: monitoring.coreos.com/v1",
        "kind: ServiceMonitor",
        "- port: metrics",
    ] {
        if !sm.contains(needed) {
            return Err(format!("servicemonitor.yaml lacks {needed:?}"));
        }
    }
    Ok(())
}

#[test]
fn prometheus_rules_check() {
    check_rules(&root().join("deploy")).unwrap();
    let broken = broken_copy(
        "prometheus/inferscope-rules.yaml",
        "expr: up{job=\"inferscope\"} == 0",
        "expr: up{job=\"inferscope\" == 0",
    );
    check_rules(broken.path()).unwrap_err();
}

#[test]
fn prometheus_rules_unit_tests() {
    test_rules(&root().join("deploy")).unwrap();
    // A threshold that no longer matches what the tests expect.
    let broken = broken_copy(
        "prometheus/inferscope-rules.yaml",
        "gpu_memory_total_bytes{job=\"inferscope\"} > 0.95",
        "gpu_memory_total_bytes{job=\"inferscope\"} > 0.97",
    );
    test_rules(broken.path()).unwrap_err();
}

#[test]
fn yaml_lints() {
    yamllint(&root().join("deploy")).unwrap();
    let broken = broken_copy(
        "manifests/servicemonitor.yaml",
        "  name: inferscope\n",
        "  name: inferscope\n  name: again\n",
    );
    yamllint(broken.path()).unwrap_err();
}

#[test]
fn manifests_validate() {
    validate_manifests(&root().join("deploy")).unwrap();
    let broken = broken_copy(
        "manifests/inferscope.yaml",
        "hostPID: true",
        "hostPID: \"yes\"",
    );
    validate_manifests(broken.path()).unwrap_err();
    let unknown_field = broken_copy(
        "manifests/inferscope.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFS: true",
    );
    validate_manifests(unknown_field.path()).unwrap_err();
}

/// Every alert names a runbook section that exists.
#[test]
fn alerts_have_runbooks() {
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/inferscope-rules.yaml")).unwrap();
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        let anchor = alert.to_lowercase();
        assert!(
            rules.contains(&format!("runbook_url: docs/runbooks.md#{anchor}\n")),
            "{alert}: no runbook_url"
        );
        assert!(
            runbooks.contains(&format!("\n## {alert}\n")),
            "docs/runbooks.md has no section for {alert}"
        );
    }
}
