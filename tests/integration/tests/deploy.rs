//! deploy/: the Helm chart, the manifests rendered from it, the Prometheus rules, the image
//! recipe and the OTel Collector example pass the tools that would reject them in a cluster
//! (helm, promtool, yamllint, kubernetes-validate, all offline), and each check fails on a
//! broken copy. The tools come from `cargo xtask setup` (test part); a missing one fails the
//! test.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use integration::yaml_docs;
use serde_json::Value;

/// The renderer of `cargo xtask manifests`, so the drift check renders exactly the same way.
use xtask::manifests;

/// Kubernetes version whose schemas kubernetes-validate ships (the DaemonSet uses
/// `appArmorProfile`, 1.30+; the chart's kubeVersion).
const KUBERNETES_VERSION: &str = "1.30.0";

/// Kinds of the Prometheus Operator: no schema in kubernetes-validate, checked by structure.
const OPERATOR_KINDS: &[&str] = &["ServiceMonitor", "PodMonitor", "PrometheusRule"];

/// The capabilities the agent needs (docs/install.md), nothing more.
const CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_RESOURCE",
    "SYS_PTRACE",
    "KILL",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart() -> PathBuf {
    root().join(manifests::CHART)
}

/// Runs the tool; `Ok` carries its stdout, `Err` its output.
fn tool(program: &str, args: &[&str], cwd: &Path) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (run `cargo xtask setup`)"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

/// A copy of deploy/ with `file`'s `from` replaced by `to`.
fn broken_copy(file: &str, from: &str, to: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&root().join("deploy"), dir.path());
    let path = dir.path().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
    dir
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], k: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind(d) == k)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

fn set<'a>(items: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
    items.into_iter().collect()
}

// ---- Prometheus rules ----

/// `deploy/<dir>`'s files ending in `suffix`, relative to deploy/, sorted.
fn deploy_files(deploy: &Path, dir: &str, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(deploy.join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    v.sort();
    v
}

/// Every rule file: recording, alerting, SLO and cost rules.
fn check_rules(deploy: &Path) -> Result<String, String> {
    let files = deploy_files(deploy, "prometheus", ".yaml");
    assert!(files.len() >= 3, "{files:?}");
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(String::as_str));
    tool("promtool", &args, deploy)
}

/// Every rule file has unit tests, and they pass.
fn test_rules(deploy: &Path) -> Result<String, String> {
    let tests = deploy_files(deploy, "prometheus/tests", ".test.yaml");
    for rules in deploy_files(deploy, "prometheus", ".yaml") {
        let name = rules.trim_start_matches("prometheus/").replace(".yaml", "");
        assert!(
            tests.contains(&format!("prometheus/tests/{name}.test.yaml")),
            "{rules} has no promtool tests"
        );
    }
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    tool("promtool", &args, deploy)
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
    // An SLO's budget and a cost figure that no longer match their tests.
    for (file, from, to) in [
        (
            "prometheus/inferscope-slo.yaml",
            "le=~\"30(\\\\.0)?\"}[1h]",
            "le=~\"20(\\\\.0)?\"}[1h]",
        ),
        (
            "prometheus/inferscope-cost.yaml",
            "1000 * node:gpu_cost:rate1h",
            "100 * node:gpu_cost:rate1h",
        ),
    ] {
        test_rules(broken_copy(file, from, to).path()).unwrap_err();
    }
}

/// Every alert names a runbook section that exists.
#[test]
fn alerts_have_runbooks() {
    let deploy = root().join("deploy");
    let rules: String = deploy_files(&deploy, "prometheus", ".yaml")
        .iter()
        .map(|f| std::fs::read_to_string(deploy.join(f)).unwrap())
        .collect();
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 20, "{alerts:?}");
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

// ---- YAML ----

/// deploy/.yamllint: yamllint's "relaxed" rules; Helm templates (Go templates) excluded.
fn yamllint(deploy: &Path) -> Result<String, String> {
    tool(
        "yamllint",
        &["-c", ".yamllint", "--no-warnings", "."],
        deploy,
    )
}

#[test]
fn yaml_lints() {
    yamllint(&root().join("deploy")).unwrap();
    for (file, from, to) in [
        (
            "manifests/servicemonitor.yaml",
            "  name: inferscope\n",
            "  name: inferscope\n  name: again\n",
        ),
        (
            "otel-collector/config.yaml",
            "  batch:\n",
            "  batch:\n  batch:\n",
        ),
        (
            "helm/inferscope/values.yaml",
            "privileged: false\n",
            "privileged: false\nprivileged: true\n",
        ),
    ] {
        yamllint(broken_copy(file, from, to).path()).unwrap_err();
    }
}

// ---- Kubernetes schemas ----

/// The built-in kinds of a rendered stream against kubernetes-validate's strict schemas; the
/// Prometheus Operator's kinds (CRDs, no schema there) by their structure. Returns the docs.
fn validate_stream(text: &str) -> Result<Vec<Value>, String> {
    let docs = yaml_docs(text);
    let dir = tempfile::tempdir().unwrap();
    let builtin: Vec<String> = docs
        .iter()
        .filter(|d| !OPERATOR_KINDS.contains(&kind(d)))
        .map(|d| d.to_string())
        .collect();
    if !builtin.is_empty() {
        std::fs::write(dir.path().join("builtin.yaml"), builtin.join("\n---\n")).unwrap();
        tool(
            "kubernetes-validate",
            &[
                "--strict",
                "--quiet",
                "-k",
                KUBERNETES_VERSION,
                "builtin.yaml",
            ],
            dir.path(),
        )?;
    }
    for doc in docs.iter().filter(|d| OPERATOR_KINDS.contains(&kind(d))) {
        check_operator_kind(doc)?;
    }
    Ok(docs)
}

fn check_operator_kind(doc: &Value) -> Result<(), String> {
    let k = kind(doc);
    let fail = |what: &str| Err(format!("{k}: {what}: {doc}"));
    if doc["apiVersion"] != "monitoring.coreos.com/v1" {
        return fail("apiVersion is not monitoring.coreos.com/v1");
    }
    if !doc["metadata"]["name"].is_string() || !doc["metadata"]["namespace"].is_string() {
        return fail("metadata.name and metadata.namespace");
    }
    let spec = &doc["spec"];
    match k {
        "ServiceMonitor" | "PodMonitor" => {
            let endpoints = if k == "ServiceMonitor" {
                &spec["endpoints"]
            } else {
                &spec["podMetricsEndpoints"]
            };
            let Some(endpoints) = endpoints.as_array().filter(|e| !e.is_empty()) else {
                return fail("no endpoints");
            };
            if endpoints
                .iter()
                .any(|e| e["port"] != "metrics" || e["path"] != "/metrics")
            {
                return fail("an endpoint is not port metrics, path /metrics");
            }
            if !spec["selector"]["matchLabels"].is_object() {
                return fail("no selector.matchLabels");
            }
            // The rules select job="inferscope": the job comes from this pod/service label.
            if spec["jobLabel"] != "app.kubernetes.io/name" {
                return fail("jobLabel");
            }
        }
        "PrometheusRule" => {
            let Some(groups) = spec["groups"].as_array().filter(|g| !g.is_empty()) else {
                return fail("no groups");
            };
            for g in groups {
                let ok = g["name"].is_string()
                    && g["rules"].as_array().is_some_and(|rules| {
                        !rules.is_empty()
                            && rules.iter().all(|r| {
                                r["expr"].is_string()
                                    && (r["record"].is_string() || r["alert"].is_string())
                            })
                    });
                if !ok {
                    return fail("a group without name or with a rule without expr");
                }
            }
        }
        _ => unreachable!(),
    }
    Ok(())
}

fn validate_manifests(deploy: &Path) -> Result<(), String> {
    let dir = deploy.join("manifests");
    let files = manifests::read_yaml_dir(&dir)?;
    for (name, text) in &files {
        validate_stream(text).map_err(|e| format!("{name}: {e}"))?;
    }
    let kinds: BTreeSet<String> = files
        .values()
        .flat_map(|t| yaml_docs(t))
        .map(|d| kind(&d).to_string())
        .collect();
    for needed in ["Namespace", "DaemonSet", "ServiceMonitor", "PrometheusRule"] {
        if !kinds.contains(needed) {
            return Err(format!("deploy/manifests has no {needed}: {kinds:?}"));
        }
    }
    Ok(())
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
    let bad_monitor = broken_copy(
        "manifests/servicemonitor.yaml",
        "- port: metrics",
        "- port: http",
    );
    validate_manifests(bad_monitor.path()).unwrap_err();
}

// ---- The chart ----

fn helm(args: &[&str]) -> Result<String, String> {
    tool("helm", args, &root())
}

/// `helm template` as release `inferscope` in namespace `inferscope`, the Prometheus
/// Operator's API present.
fn template(chart: &Path, values: &[&str]) -> Result<String, String> {
    let chart = chart.to_str().unwrap();
    let mut args = vec![
        "template",
        "inferscope",
        chart,
        "--namespace",
        "inferscope",
        "--api-versions",
        "monitoring.coreos.com/v1",
    ];
    for v in values {
        args.extend(["--set", v]);
    }
    helm(&args)
}

#[test]
fn helm_lint_strict() {
    let chart = chart();
    helm(&["lint", "--strict", chart.to_str().unwrap()]).unwrap();
    for (file, from, to) in [
        // A template that does not parse.
        (
            "helm/inferscope/templates/service.yaml",
            "{{- include \"inferscope.selectorLabels\" . | nindent 4 }}",
            "{{- include \"inferscope.selectorLabels\" . | nindent 4 ",
        ),
        // Chart.yaml without a version.
        ("helm/inferscope/Chart.yaml", "version: 0.1.0\n", ""),
    ] {
        let broken = broken_copy(file, from, to);
        let chart = broken.path().join("helm/inferscope");
        helm(&["lint", "--strict", chart.to_str().unwrap()]).unwrap_err();
    }
}

fn daemonset_container(docs: &[Value]) -> &Value {
    let ds = find(docs, "DaemonSet").expect("no DaemonSet");
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "{ds}");
    &containers[0]
}

fn env_names(container: &Value) -> Vec<&str> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

/// `flag`'s values in the container's args (a flag followed by its value).
fn flag_values<'a>(container: &'a Value, flag: &str) -> Vec<&'a str> {
    let args = strings(&container["args"]);
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1])
        .collect()
}

fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    yaml_docs(&chart)[0]["appVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The groups of every rule file in deploy/prometheus/, in file name order (a file without
/// groups adds none, as in the chart).
fn rule_groups() -> Vec<Value> {
    manifests::read_yaml_dir(&root().join(manifests::RULES))
        .unwrap()
        .values()
        .flat_map(|text| {
            let groups = &yaml_docs(text)[0]["groups"];
            groups.as_array().cloned().unwrap_or_default()
        })
        .collect()
}

#[test]
fn chart_defaults() {
    let text = template(&chart(), &[]).unwrap();
    let docs = validate_stream(&text).unwrap();
    let kinds = set(docs.iter().map(kind));
    assert_eq!(
        kinds,
        set([
            "ServiceAccount",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "DaemonSet",
            "ServiceMonitor",
            "PrometheusRule",
            "NetworkPolicy",
        ]),
        "PodMonitor is off and the Namespace left to `helm install --create-namespace` by default"
    );

    let ds = find(&docs, "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"),
        "{pod}"
    );
    let c = daemonset_container(&docs);
    assert_eq!(
        c["image"],
        format!("ghcr.io/inferscope/inferscope:{}", chart_app_version())
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsUser"], 0, "the agent requires euid 0");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        set(strings(&sc["capabilities"]["add"])),
        set(CAPABILITIES.iter().copied())
    );
    assert_eq!(
        strings(&sc["capabilities"]["add"]).len(),
        CAPABILITIES.len()
    );
    // The agent's own seccomp profile, installed on the node by an init container that holds
    // no capability and mounts nothing but the kubelet's seccomp directory.
    assert_eq!(sc["seccompProfile"]["type"], "Localhost");
    assert_eq!(
        sc["seccompProfile"]["localhostProfile"],
        "inferscope/agent.json"
    );
    let inits = pod["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    assert_eq!(init["image"], c["image"]);
    assert_eq!(
        strings(&init["command"])
            .into_iter()
            .chain(strings(&init["args"]))
            .collect::<Vec<_>>(),
        [
            "/inferscope",
            "seccomp-profile",
            "--install",
            "/host/seccomp/inferscope/agent.json"
        ]
    );
    let isc = &init["securityContext"];
    assert_eq!(strings(&isc["capabilities"]["drop"]), ["ALL"]);
    assert!(isc["capabilities"]["add"].is_null(), "{isc}");
    assert_eq!(isc["allowPrivilegeEscalation"], false);
    assert_eq!(isc["readOnlyRootFilesystem"], true);
    assert_eq!(isc["seccompProfile"]["type"], "RuntimeDefault");
    let init_mounts = init["volumeMounts"].as_array().unwrap();
    assert_eq!(init_mounts.len(), 1, "{init_mounts:?}");
    assert_eq!(init_mounts[0]["mountPath"], "/host/seccomp");

    // The image's entrypoint is `inferscope run`: the args are its flags only.
    assert!(c["command"].is_null(), "{c}");
    assert!(strings(&c["args"])[0].starts_with("--"), "{c}");
    assert_eq!(flag_values(c, "--prometheus-listen"), ["0.0.0.0:9464"]);
    assert_eq!(
        flag_values(c, "--forensics-dir"),
        ["/var/lib/inferscope/forensics"]
    );
    assert_eq!(flag_values(c, "--watch-port"), ["8000", "8080", "30000"]);
    assert_eq!(flag_values(c, "--config"), ["/etc/inferscope/config.toml"]);

    let node_name = env_value(c, "NODE_NAME").expect("NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let otel: Vec<&str> = env_names(c)
        .into_iter()
        .filter(|n| n.starts_with("OTEL_"))
        .collect();
    assert!(otel.is_empty(), "OTLP is off by default: {otel:?}");

    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 9464);
    assert!(c["resources"]["limits"]["memory"].is_string(), "{c}");
    assert!(c["resources"]["limits"]["cpu"].is_string(), "{c}");

    // Host paths: each mounted, read-only except the forensics directory.
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let host_path_mount = |host: &str| {
        let volume = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("no hostPath volume {host}"));
        mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("hostPath {host} is not mounted"))
    };
    for (host, at) in [
        ("/proc", "/host/proc"),
        ("/sys/kernel/btf", "/sys/kernel/btf"),
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        (
            "/var/lib/kubelet/pod-resources",
            "/var/lib/kubelet/pod-resources",
        ),
        ("/usr/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64"),
    ] {
        let m = host_path_mount(host);
        assert_eq!(m["mountPath"], at, "{host}");
        assert_eq!(m["readOnly"], true, "{host}");
    }
    let forensics = host_path_mount("/var/lib/inferscope/forensics");
    assert_eq!(forensics["mountPath"], "/var/lib/inferscope/forensics");
    assert!(forensics["readOnly"].is_null(), "{forensics}");
    let seccomp_dir = volumes
        .iter()
        .find(|v| v["name"] == init_mounts[0]["name"])
        .unwrap();
    assert_eq!(seccomp_dir["hostPath"]["path"], "/var/lib/kubelet/seccomp");
    assert!(
        mounts.iter().all(|m| m["name"] != seccomp_dir["name"]),
        "the agent's container does not mount the profiles"
    );
    assert_eq!(
        volumes.iter().filter(|v| v["hostPath"].is_object()).count(),
        8,
        "a host path beyond those above: {volumes:?}"
    );

    // RBAC: get/list/watch on pods, nothing else.
    let role = find(&docs, "ClusterRole").unwrap();
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{role}");
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);
    assert_eq!(
        set(strings(&rules[0]["verbs"])),
        set(["get", "list", "watch"])
    );
    assert_eq!(strings(&rules[0]["verbs"]).len(), 3);
    let binding = find(&docs, "ClusterRoleBinding").unwrap();
    let sa = find(&docs, "ServiceAccount").unwrap();
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], "inferscope");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);

    // The Service and the monitor reach the pods.
    let svc = find(&docs, "Service").unwrap();
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    let sm = find(&docs, "ServiceMonitor").unwrap();
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"], "inferscope",
        "the job label of the rules' job=\"inferscope\""
    );

    // The NetworkPolicy admits the metrics port of the agent's pods and nothing else.
    let np = find(&docs, "NetworkPolicy").unwrap();
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(strings(&np["spec"]["policyTypes"]), ["Ingress"]);
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1, "{np}");
    assert_eq!(
        ingress[0]["ports"],
        serde_json::json!([{"port": "metrics", "protocol": "TCP"}])
    );
    assert!(
        ingress[0]["from"].is_null(),
        "from anywhere by default: {np}"
    );

    // The PrometheusRule is every rule file of deploy/prometheus/, unchanged.
    let rule = find(&docs, "PrometheusRule").unwrap();
    assert_eq!(rule["spec"]["groups"], Value::Array(rule_groups()));

    // Without the Prometheus Operator's API, no object of its kinds.
    let plain = yaml_docs(
        &helm(&[
            "template",
            "inferscope",
            chart().to_str().unwrap(),
            "--namespace",
            "inferscope",
        ])
        .unwrap(),
    );
    let plain_kinds = set(plain.iter().map(kind));
    assert!(
        OPERATOR_KINDS.iter().all(|k| !plain_kinds.contains(k)),
        "{plain_kinds:?}"
    );
}

/// The seccomp choices: the runtime's default profile (nothing installed), a profile the
/// nodes get another way (no init container), and a NetworkPolicy naming Prometheus alone.
#[test]
fn chart_seccomp_and_network_policy_values() {
    let runtime_default = validate_stream(
        &template(
            &chart(),
            &["seccomp.type=RuntimeDefault", "networkPolicy.enabled=false"],
        )
        .unwrap(),
    )
    .unwrap();
    let pod = &find(&runtime_default, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "{pod}");
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["hostPath"]["path"] != "/var/lib/kubelet/seccomp"),
        "{pod}"
    );
    let sc = &daemonset_container(&runtime_default)["securityContext"];
    assert_eq!(
        sc["seccompProfile"],
        serde_json::json!({"type": "RuntimeDefault"})
    );
    assert!(find(&runtime_default, "NetworkPolicy").is_none());

    let provisioned = validate_stream(
        &template(
            &chart(),
            &[
                "seccomp.install=false",
                "seccomp.localhostProfile=profiles/agent.json",
                "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let pod = &find(&provisioned, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "{pod}");
    let sc = &daemonset_container(&provisioned)["securityContext"];
    assert_eq!(
        sc["seccompProfile"]["localhostProfile"],
        "profiles/agent.json"
    );
    let np = find(&provisioned, "NetworkPolicy").unwrap();
    assert_eq!(
        np["spec"]["ingress"][0]["from"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}])
    );
}

/// Without `uprobeSysAdmin` (kernels that still let CAP_PERFMON attach uprobes) the container
/// holds the same set less CAP_SYS_ADMIN.
#[test]
fn chart_without_sys_admin_for_uprobes() {
    let text = template(&chart(), &["uprobeSysAdmin=false"]).unwrap();
    let docs = validate_stream(&text).unwrap();
    let sc = &daemonset_container(&docs)["securityContext"];
    assert_eq!(
        set(strings(&sc["capabilities"]["add"])),
        set(CAPABILITIES.iter().copied().filter(|c| *c != "SYS_ADMIN"))
    );
}

#[test]
fn chart_non_default_values() {
    let text = template(
        &chart(),
        &[
            "privileged=true",
            "uprobeSysAdmin=false",
            "serviceMonitor.enabled=false",
            "podMonitor.enabled=true",
            "otlp.endpoint=http://otel-collector.observability:4318",
            "otlp.protocol=http/protobuf",
            "otlp.headersSecret.name=otlp-auth",
            "clusterName=gpu-east",
            "forensics.hostPath=",
            "rbac.create=false",
            "agent.watchPorts={9000}",
            "agent.disableProbes={http}",
            "image.tag=dev",
            "config.probes.stack_sample_bytes=16",
        ],
    )
    .unwrap();
    let docs = validate_stream(&text).unwrap();
    let kinds = set(docs.iter().map(kind));
    assert!(kinds.contains("PodMonitor"), "{kinds:?}");
    assert!(!kinds.contains("ServiceMonitor"), "{kinds:?}");
    assert!(!kinds.contains("ClusterRole"), "{kinds:?}");
    let pm = find(&docs, "PodMonitor").unwrap();
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");

    let c = daemonset_container(&docs);
    assert_eq!(c["image"], "ghcr.io/inferscope/inferscope:dev");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], true);
    assert!(sc["capabilities"].is_null(), "{sc}");
    assert!(
        sc["seccompProfile"].is_null(),
        "privileged: unconfined anyway"
    );
    assert!(
        docs.iter()
            .all(|d| d["spec"]["template"]["spec"]["initContainers"].is_null()),
        "no profile to install"
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(flag_values(c, "--watch-port"), ["9000"]);
    assert_eq!(flag_values(c, "--disable-probe"), ["http"]);

    let value = |name: &str| {
        env_value(c, name)
            .unwrap_or_else(|| panic!("no {name}"))
            .get("value")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name} has no value"))
            .to_string()
    };
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "http://otel-collector.observability:4318"
    );
    assert_eq!(value("OTEL_EXPORTER_OTLP_PROTOCOL"), "http/protobuf");
    let attrs = value("OTEL_RESOURCE_ATTRIBUTES");
    assert!(attrs.contains("k8s.cluster.name=gpu-east"), "{attrs}");
    assert!(attrs.contains("k8s.node.name=$(NODE_NAME)"), "{attrs}");
    let headers = env_value(c, "OTEL_EXPORTER_OTLP_HEADERS").expect("headers");
    assert_eq!(
        headers["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "otlp-auth", "key": "headers"})
    );
    // NODE_NAME is defined before the variables that expand it.
    let names = env_names(c);
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(
        pos("NODE_NAME") < pos("OTEL_RESOURCE_ATTRIBUTES"),
        "{names:?}"
    );

    let ds = find(&docs, "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    let forensics = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "forensics")
        .unwrap();
    assert_eq!(forensics["emptyDir"]["sizeLimit"], "256Mi", "{forensics}");
    let cm = find(&docs, "ConfigMap").unwrap();
    let toml = cm["data"]["config.toml"].as_str().unwrap();
    assert!(toml.contains("stack_sample_bytes = 16\n"), "{toml}");
}

/// The agent takes what the chart renders: `inferscope run` accepts the flags and their values
/// (clap validates everything before printing help), and its strict config loader (through
/// `inferscope forensics list --config`, which needs no root) takes the ConfigMap's
/// config.toml, typed as the agent expects (integers stay integers).
#[test]
fn agent_accepts_the_rendered_args_and_config() {
    let agent = integration::bin("inferscope");
    let dir = tempfile::tempdir().unwrap();
    let accepts = |values: &[&str]| -> Result<(), String> {
        let docs = yaml_docs(&template(&chart(), values).unwrap());
        let args = strings(&daemonset_container(&docs)["args"]);
        let out = Command::new(&agent)
            .arg("run")
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "inferscope run {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let toml = find(&docs, "ConfigMap").unwrap()["data"]["config.toml"]
            .as_str()
            .unwrap()
            .to_string();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, &toml).unwrap();
        let out = Command::new(&agent)
            .args(["forensics", "list", "--config"])
            .arg(&file)
            .arg("--forensics-dir")
            .arg(dir.path().join("reports"))
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "config.toml refused: {}\n{toml}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    };
    accepts(&[]).unwrap();
    accepts(&[
        "agent.cudaLibs={/host/proc/1/root/usr/lib/libcuda.so.1}",
        "agent.nvmlLib=/usr/local/nvidia/lib64/libnvidia-ml.so.1",
        "agent.disableProbes={sched,cuMemHostAlloc}",
        "metrics.port=9500",
        "config.probes.ring_buffer_bytes=16777216",
        "config.http.match_commands={vllm}",
        "config.limits.max_label_len=32",
        "config.cost.gpu_hour_price=2",
        "config.cost.gpu_hour_price_by_type.NVIDIA H100 80GB HBM3=4",
        "forensics.maxBytes=1073741824",
    ])
    .unwrap();
    // The same checks refuse a flag or a key the agent does not have.
    accepts(&["extraArgs={--prometheus-port,9464}"]).unwrap_err();
    accepts(&["config.probes.no_such_key=1"]).unwrap_err();
}

#[test]
fn chart_refuses_bad_values() {
    for (values, message) in [
        (
            &["podMonitor.enabled=true"][..],
            "serviceMonitor.enabled and podMonitor.enabled",
        ),
        (
            &["otlp.endpoint=http://c:4317", "otlp.protocol=http"][..],
            "otlp.protocol",
        ),
        (&["seccomp.type=unconfined"][..], "seccomp.type"),
    ] {
        let err = template(&chart(), values).unwrap_err();
        assert!(err.contains(message), "{values:?}: {err}");
    }
}

/// deploy/manifests/ and the chart's rule copies are what `cargo xtask manifests` makes of
/// the chart and deploy/prometheus/ now.
#[test]
fn manifests_match_the_chart() {
    let fresh = tempfile::tempdir().unwrap();
    let fresh_chart = fresh.path().join("inferscope");
    copy_tree(&chart(), &fresh_chart);
    let rules = manifests::read_yaml_dir(&root().join(manifests::RULES)).unwrap();
    manifests::write_yaml_dir(&manifests::chart_rules(&fresh_chart), &rules).unwrap();
    let committed_rules =
        manifests::read_yaml_dir(&manifests::chart_rules(&chart())).unwrap_or_default();
    let dashboards =
        manifests::read_dir_files(&root().join(manifests::DASHBOARDS), ".json").unwrap();
    manifests::write_dir_files(
        &manifests::chart_dashboards(&fresh_chart),
        ".json",
        &dashboards,
    )
    .unwrap();
    let committed_dashboards =
        manifests::read_dir_files(&manifests::chart_dashboards(&chart()), ".json")
            .unwrap_or_default();
    let rendered = manifests::render("helm", &fresh_chart).unwrap();
    let committed = manifests::read_yaml_dir(&root().join(manifests::MANIFESTS)).unwrap();
    let helm_version = helm(&["version", "--short"]).unwrap();
    let helm_version = helm_version.trim();
    let stale = |what: &str, now: &manifests::Files, then: &manifests::Files| {
        let differ: Vec<&String> = now
            .keys()
            .chain(then.keys())
            .filter(|k| now.get(*k) != then.get(*k))
            .collect();
        assert!(
            differ.is_empty(),
            "{what} is stale ({differ:?} differ): run `cargo xtask manifests` and commit \
             (rendered by {helm_version})"
        );
    };
    stale(
        &format!("{}/{}", manifests::CHART, manifests::CHART_RULES),
        &rules,
        &committed_rules,
    );
    stale(
        &format!("{}/{}", manifests::CHART, manifests::CHART_DASHBOARDS),
        &dashboards,
        &committed_dashboards,
    );
    stale(manifests::MANIFESTS, &rendered, &committed);
    assert!(rendered.contains_key("inferscope.yaml"), "{rendered:?}");
    assert!(
        rendered.contains_key("grafana-dashboards.yaml"),
        "{rendered:?}"
    );
}

// ---- Image recipe ----

/// deploy/Dockerfile: a builder stage running `cargo xtask build`, and a final distroless
/// glibc stage holding only the binary that command leaves, run as `inferscope run`.
#[test]
fn dockerfile_structure() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let xtask = std::fs::read_to_string(root().join("xtask/src/main.rs")).unwrap();
    let built = "target/release/inferscope";
    assert!(
        xtask.contains(built),
        "xtask/src/main.rs no longer says where `cargo xtask build` leaves the agent"
    );
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "{instructions:?}");
    let builder = &instructions[stages[0]..stages[1]];
    let last = &instructions[stages[1]..];
    let (image, alias) = builder[0]
        .strip_prefix("FROM ")
        .unwrap()
        .split_once(" AS ")
        .expect("a named builder stage");
    assert!(
        image.ends_with("-bookworm"),
        "builder on Debian 12: {image}"
    );
    assert!(
        builder
            .iter()
            .any(|l| l.starts_with("RUN ") && l.ends_with("cargo xtask build")),
        "{builder:?}"
    );
    assert_eq!(last[0], "FROM gcr.io/distroless/cc-debian12");
    let copies: Vec<&&str> = last.iter().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(
        copies,
        [&format!("COPY --from={alias} /src/{built} /inferscope").as_str()],
        "the final stage holds the agent binary only"
    );
    assert!(
        builder.contains(&"WORKDIR /src"),
        "the builder builds in /src: {builder:?}"
    );
    assert!(
        !last.iter().any(|l| l.starts_with("RUN ")),
        "distroless has no shell"
    );
    assert_eq!(
        last.last().unwrap(),
        &r#"ENTRYPOINT ["/inferscope", "run"]"#
    );
}

/// The final stage has glibc, libgcc and libstdc++ only (distroless cc): the agent must need
/// no other shared library.
#[test]
fn agent_needs_only_what_distroless_cc_has() {
    const DISTROLESS_CC: &[&str] = &[
        "ld-linux-x86-64.so.2",
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
        "libgcc_s.so.1",
        "libstdc++.so.6",
    ];
    let agent = integration::bin("inferscope");
    let dynamic = tool("readelf", &["-d", agent.to_str().unwrap()], &root()).unwrap();
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split_once('[')?.1.strip_suffix(']'))
        .collect();
    assert!(needed.contains(&"libc.so.6"), "{dynamic}");
    let missing: Vec<&&str> = needed
        .iter()
        .filter(|n| !DISTROLESS_CC.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "not in gcr.io/distroless/cc-debian12: {missing:?}"
    );
}

// ---- OTel Collector example ----

/// Every component a pipeline names is defined, and the receivers listen on the OTLP ports
/// the chart's otlp.endpoint points at.
#[test]
fn otel_collector_config_is_consistent() {
    fn check(text: &str) -> Result<(), String> {
        let config = &yaml_docs(text)[0];
        let pipelines = config["service"]["pipelines"]
            .as_object()
            .ok_or("no service.pipelines")?;
        for signal in ["metrics", "traces", "logs"] {
            if !pipelines.contains_key(signal) {
                return Err(format!("no {signal} pipeline"));
            }
        }
        for (name, pipeline) in pipelines {
            for section in ["receivers", "processors", "exporters"] {
                for component in strings(&pipeline[section]) {
                    if !config[section][component].is_object() {
                        return Err(format!("{name}: {section} {component} is not defined"));
                    }
                }
            }
        }
        let otlp = &config["receivers"]["otlp"]["protocols"];
        if otlp["grpc"]["endpoint"] != "0.0.0.0:4317" || otlp["http"]["endpoint"] != "0.0.0.0:4318"
        {
            return Err(format!("OTLP receiver endpoints: {otlp}"));
        }
        Ok(())
    }
    let path = root().join("deploy/otel-collector/config.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    check(&text).unwrap();
    let broken = text.replacen(
        "exporters: [prometheusremotewrite]",
        "exporters: [prometheus]",
        1,
    );
    assert_ne!(broken, text);
    check(&broken).unwrap_err();
}

/// values.yaml documents each value (a comment right above every top-level key), and its
/// top-level keys are exactly those the templates read.
#[test]
fn chart_values_are_documented_and_used() {
    let values = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let lines: Vec<&str> = values.lines().collect();
    let mut keys = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((key, _)) = line.split_once(':') else {
            continue;
        };
        if line.starts_with([' ', '#', '-']) || key.is_empty() {
            continue;
        }
        assert!(
            i > 0 && lines[i - 1].starts_with('#'),
            "values.yaml: {key} has no comment"
        );
        keys.insert(key.to_string());
    }
    let mut used = BTreeSet::new();
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for part in text.split(".Values.").skip(1) {
            let key: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            used.insert(key);
        }
    }
    assert_eq!(
        keys, used,
        "values.yaml keys vs. the keys the templates read"
    );
}
