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
            "Pod",
        ]),
        "PodMonitor is off, the Namespace left to `helm install --create-namespace` and the \
         `helm test` pod rendered (a hook) by default"
    );

    let ds = find(&docs, "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    // GPU nodes are found by node affinity, any of several labels; the selector only keeps
    // the agent off architectures its eBPF programs do not support.
    assert_eq!(
        pod["nodeSelector"],
        serde_json::json!({"kubernetes.io/arch": "amd64"}),
        "{pod}"
    );
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
    // The peers given, and the `helm test` pod.
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0],
        serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "monitoring"}}})
    );
    assert_eq!(
        np["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"]
            ["app.kubernetes.io/component"],
        "helm-test"
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
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "serviceAccount.automountToken, not rbac.create, decides"
    );
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
    let templates = chart().join("templates");
    let tests = std::fs::read_dir(templates.join("tests")).unwrap();
    for entry in std::fs::read_dir(&templates).unwrap().chain(tests) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
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

// ---- Install path, node discovery, driver mounts ----

/// The shell commands of docs/install.md's code blocks, continuation lines joined, split
/// into words (quotes removed).
fn install_doc_commands() -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(root().join("docs/install.md")).unwrap();
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in doc.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.split(" # ").next().unwrap().trim_end();
        match line.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(line);
                commands.push(shell_words(&pending));
                pending.clear();
            }
        }
    }
    commands
}

/// Whitespace-separated words; single and double quotes group and are removed.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            (_, c) => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// The documented `helm install` runs as `helm template` with the same flags and as
/// `helm lint` with the same values: it renders no Namespace (Helm's --create-namespace makes
/// it; a chart-owned one conflicts), everything validates, and the doc labels the namespace
/// for Pod Security with the exact command.
#[test]
fn documented_install_commands_render() {
    let commands = install_doc_commands();
    let installs: Vec<&Vec<String>> = commands
        .iter()
        .filter(|c| c.len() > 2 && c[0] == "helm" && c[1] == "install")
        .collect();
    assert!(
        !installs.is_empty(),
        "docs/install.md has no `helm install`"
    );
    for install in installs {
        let args: Vec<&str> = install[2..].iter().map(String::as_str).collect();
        assert!(args.contains(&"--create-namespace"), "{install:?}");
        assert!(
            !args.iter().any(|a| a.starts_with("namespace.create")),
            "{install:?}"
        );
        let mut template = vec!["template"];
        template.extend(&args);
        let docs = validate_stream(&helm(&template).unwrap())
            .unwrap_or_else(|e| panic!("{install:?}: {e}"));
        assert!(find(&docs, "Namespace").is_none(), "{install:?}");
        assert!(find(&docs, "DaemonSet").is_some(), "{install:?}");
        // helm lint takes the chart, the namespace and the values, not install's other flags.
        let chart = args[1];
        let mut lint = vec!["lint", "--strict", chart];
        for w in args[2..].windows(2) {
            if [
                "--namespace",
                "-n",
                "--set",
                "--set-string",
                "-f",
                "--values",
            ]
            .contains(&w[0])
            {
                lint.extend([w[0], w[1]]);
            }
        }
        helm(&lint).unwrap_or_else(|e| panic!("{install:?}: {e}"));
    }
    let label = shell_words(
        "kubectl label namespace inferscope pod-security.kubernetes.io/enforce=privileged",
    );
    assert!(
        commands.iter().any(|c| c.starts_with(&label)),
        "docs/install.md does not label the namespace for Pod Security"
    );
    // The one kubectl recipe the forensics need: the agent on the alert's node, its binary
    // by absolute path (distroless: no PATH lookup of a shell), HTML to stdout.
    let exec: Vec<&Vec<String>> = commands
        .iter()
        .filter(|c| c.first().is_some_and(|w| w == "kubectl") && c.contains(&"exec".into()))
        .collect();
    assert!(!exec.is_empty());
    for c in &exec {
        let at = c
            .iter()
            .position(|w| w == "--")
            .expect("kubectl exec … -- cmd");
        assert_eq!(c[at + 1], "/inferscope", "{c:?}: the image's binary");
    }
    assert!(
        exec.iter()
            .any(|c| c.windows(2).any(|w| w[0] == "--format" && w[1] == "html")),
        "{exec:?}"
    );
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(" /inferscope\n"),
        "the binary is /inferscope"
    );
}

/// NOTES.txt names the labels the DaemonSet selects nodes by and, with no cluster to count
/// nodes in (lookup answers nothing), says so and how to count them.
#[test]
fn chart_notes_say_which_nodes() {
    let notes = |values: &[&str]| {
        let mut args = vec![
            "install",
            "inferscope",
            manifests::CHART,
            "--namespace",
            "inferscope",
            "--dry-run=client",
        ];
        for v in values {
            args.extend(["--set", v]);
        }
        let out = helm(&args).unwrap();
        out.split_once("NOTES:").expect("no NOTES").1.to_string()
    };
    let text = notes(&[]);
    for needle in [
        "nvidia.com/gpu.present in (true)",
        "feature.node.kubernetes.io/pci-10de.present in (true)",
        "inferscope.io/gpu in (true)",
        "Nodes matched: could not count",
        "desiredNumberScheduled",
        "nvidia.preset=debian (host /usr/lib/x86_64-linux-gnu -> /usr/local/nvidia/lib64)",
        "--field-selector spec.nodeName=NODE",
    ] {
        assert!(text.contains(needle), "NOTES lack {needle:?}:\n{text}");
    }
    let custom = notes(&["nodeSelector.pool=gpu", "nvidia.preset=cdi"]);
    assert!(
        custom.contains(r#"every label of {"kubernetes.io/arch":"amd64","pool":"gpu"}"#),
        "{custom}"
    );
    assert!(custom.contains("no mount"), "{custom}");
}

/// The node count of NOTES.txt (inferscope.matchingNodes) on a node list: any one of
/// gpuNodeLabels, and every nodeSelector label.
#[test]
fn chart_counts_matching_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("inferscope");
    copy_tree(&chart(), &copy);
    // What lookup "v1" "Node" returns, as items.
    let probe = r#"{{- $nodes := `
- metadata: {name: gfd, labels: {nvidia.com/gpu.present: "true", pool: a, kubernetes.io/arch: amd64}}
- metadata: {name: nfd, labels: {feature.node.kubernetes.io/pci-10de.present: "true", kubernetes.io/arch: amd64}}
- metadata: {name: gke, labels: {cloud.google.com/gke-accelerator: nvidia-l4, pool: a, kubernetes.io/arch: amd64}}
- metadata: {name: off, labels: {nvidia.com/gpu.present: "false", pool: a, kubernetes.io/arch: amd64}}
- metadata: {name: cpu, labels: {pool: a, kubernetes.io/arch: amd64}}
- metadata: {name: bare, labels: {kubernetes.io/arch: amd64}}
- metadata: {name: grace, labels: {nvidia.com/gpu.present: "true", pool: a, kubernetes.io/arch: arm64}}
` | fromYamlArray }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: count
data:
  count: {{ include "inferscope.matchingNodes" (dict "root" . "nodes" $nodes) | quote }}
"#;
    std::fs::write(copy.join("templates/zz-count.yaml"), probe).unwrap();
    let count = |values: &[&str]| {
        let docs = yaml_docs(&template(&copy, values).unwrap());
        docs.iter()
            .find(|d| d["metadata"]["name"] == "count")
            .unwrap()["data"]["count"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(count(&[]), "3");
    assert_eq!(count(&["nodeSelector.pool=a"]), "2");
    assert_eq!(count(&["gpuNodeLabels=null"]), "6");
}

/// The node affinity: one term per GPU label (ORed), Exists where no values are given; the
/// user's affinity replaces it and the user's nodeSelector is rendered as given.
#[test]
fn chart_gpu_node_affinity() {
    let docs = yaml_docs(&template(&chart(), &[]).unwrap());
    let pod = &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    let terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    let exprs: Vec<&Value> = terms
        .iter()
        .map(|t| {
            let e = t["matchExpressions"].as_array().unwrap();
            assert_eq!(e.len(), 1, "one label per term, so any one suffices: {t}");
            &e[0]
        })
        .collect();
    let by_key = |k: &str| *exprs.iter().find(|e| e["key"] == k).unwrap();
    for key in [
        "nvidia.com/gpu.present",
        "feature.node.kubernetes.io/pci-10de.present",
        "inferscope.io/gpu",
    ] {
        assert_eq!(by_key(key)["operator"], "In", "{key}");
        assert_eq!(strings(&by_key(key)["values"]), ["true"], "{key}");
    }
    assert_eq!(
        by_key("cloud.google.com/gke-accelerator")["operator"],
        "Exists"
    );

    let custom = validate_stream(
        &template(
            &chart(),
            &[
                "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=gpu",
                "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
                "nodeSelector.pool=inference",
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let pod = &find(&custom, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(
        terms,
        &serde_json::json!([{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}])
    );
    // Added to the default, which keeps the agent on x86_64.
    assert_eq!(
        pod["nodeSelector"],
        serde_json::json!({"kubernetes.io/arch": "amd64", "pool": "inference"})
    );
}

/// Each nvidia.preset renders, validates and mounts its node image's driver directory, with
/// type "" (a node without it still starts the pod), read-only, where the agent looks for
/// NVML (agent/src/probe/discover.rs); the GPU operator's driver root with HostToContainer
/// propagation; cdi and none mount nothing.
#[test]
fn chart_nvidia_presets() {
    let search = std::fs::read_to_string(root().join("agent/src/probe/discover.rs")).unwrap();
    let lib = "/usr/local/nvidia/lib64";
    for (preset, host, at, propagation) in [
        ("debian", "/usr/lib/x86_64-linux-gnu", lib, None),
        ("ubuntu", "/usr/lib/x86_64-linux-gnu", lib, None),
        ("rhel", "/usr/lib64", lib, None),
        ("amazonlinux", "/usr/lib64", lib, None),
        ("cos", "/home/kubernetes/bin/nvidia/lib64", lib, None),
        (
            "gpu-operator",
            "/run/nvidia/driver",
            "/run/nvidia/driver",
            Some("HostToContainer"),
        ),
        ("cdi", "", "", None),
        ("none", "", "", None),
    ] {
        let docs =
            validate_stream(&template(&chart(), &[&format!("nvidia.preset={preset}")]).unwrap())
                .unwrap_or_else(|e| panic!("{preset}: {e}"));
        let pod = &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "nvidia-driver");
        let mount = daemonset_container(&docs)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "nvidia-driver");
        if host.is_empty() {
            assert!(volume.is_none() && mount.is_none(), "{preset}: {pod}");
            continue;
        }
        let (volume, mount) = (volume.unwrap(), mount.unwrap());
        assert_eq!(volume["hostPath"]["path"], host, "{preset}");
        assert_eq!(volume["hostPath"]["type"], "", "{preset}: never Directory");
        assert_eq!(mount["mountPath"], at, "{preset}");
        assert_eq!(mount["readOnly"], true, "{preset}");
        assert_eq!(
            mount["mountPropagation"].as_str(),
            propagation,
            "{preset}: {mount}"
        );
        // The agent's NVML search covers the mount: the directory itself, or under the
        // driver root.
        assert!(
            search.contains(&format!("\"{at}\"")) || search.contains(&format!("\"{at}/")),
            "{preset}: the agent does not search {at}"
        );
    }
    // driverLibDir replaces a preset's directory, and mounts one for a preset without any.
    let docs = yaml_docs(
        &template(
            &chart(),
            &[
                "nvidia.preset=none",
                "nvidia.driverLibDir=/opt/nvidia/lib64",
            ],
        )
        .unwrap(),
    );
    let pod = &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"]["path"] == "/opt/nvidia/lib64"),
        "{pod}"
    );
    let err = template(&chart(), &["nvidia.preset=arch"]).unwrap_err();
    assert!(err.contains("nvidia.preset"), "{err}");
}

// ---- Monitors and rules ----

/// Applies Prometheus target relabelings (replace, labeldrop) to a label set.
fn relabel(labels: &mut std::collections::BTreeMap<String, String>, configs: &Value) {
    for c in configs.as_array().unwrap() {
        match c["action"].as_str().unwrap_or("replace") {
            "replace" => {
                let value: Vec<String> = strings(&c["sourceLabels"])
                    .iter()
                    .map(|l| labels.get(*l).cloned().unwrap_or_default())
                    .collect();
                labels.insert(
                    c["targetLabel"].as_str().unwrap().to_string(),
                    value.join(";"),
                );
            }
            "labeldrop" => {
                let re = format!("^(?:{})$", c["regex"].as_str().unwrap());
                let alternatives: Vec<&str> = re
                    .trim_start_matches("^(?:")
                    .trim_end_matches(")$")
                    .split('|')
                    .collect();
                labels.retain(|k, _| !alternatives.contains(&k.as_str()));
            }
            other => panic!("relabel action {other} not modelled"),
        }
    }
}

/// Both monitors keep the agent pod's own namespace/pod/container off the series (as
/// agent_namespace/agent_pod), so a series without workload labels (GPU, host process)
/// does not read as the agent's workload; the monitor values are rendered.
#[test]
fn chart_monitors_keep_agent_labels_off_workload_series() {
    for (monitor, endpoints, enable) in [
        ("ServiceMonitor", "endpoints", vec![]),
        (
            "PodMonitor",
            "podMetricsEndpoints",
            vec!["serviceMonitor.enabled=false", "podMonitor.enabled=true"],
        ),
    ] {
        let key = if monitor == "ServiceMonitor" {
            "serviceMonitor"
        } else {
            "podMonitor"
        };
        let docs = validate_stream(&template(&chart(), &enable).unwrap()).unwrap();
        let ep = &find(&docs, monitor).unwrap()["spec"][endpoints][0];
        assert_eq!(ep["honorLabels"], true, "{monitor}");
        // The target labels the operator sets before the user's relabelings.
        let mut labels: std::collections::BTreeMap<String, String> = [
            ("__meta_kubernetes_namespace", "inferscope"),
            ("__meta_kubernetes_pod_name", "inferscope-abcde"),
            ("__meta_kubernetes_pod_node_name", "gpu-1"),
            ("namespace", "inferscope"),
            ("pod", "inferscope-abcde"),
            ("container", "agent"),
            ("job", "inferscope"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        relabel(&mut labels, &ep["relabelings"]);
        for gone in ["namespace", "pod", "container"] {
            assert!(!labels.contains_key(gone), "{monitor}: {labels:?}");
        }
        assert_eq!(labels["agent_namespace"], "inferscope", "{monitor}");
        assert_eq!(labels["agent_pod"], "inferscope-abcde", "{monitor}");
        assert_eq!(labels["node"], "gpu-1", "{monitor}");

        let mut values = enable.clone();
        let custom = [
            format!("{key}.namespace=monitoring"),
            format!("{key}.honorLabels=false"),
            format!("{key}.relabelings[0].targetLabel=cluster"),
            format!("{key}.relabelings[0].replacement=east"),
            format!("{key}.metricRelabelings[0].action=drop"),
            format!("{key}.metricRelabelings[0].sourceLabels[0]=__name__"),
            format!("{key}.metricRelabelings[0].regex=inferscope_build_info"),
        ];
        values.extend(custom.iter().map(String::as_str));
        let docs = validate_stream(&template(&chart(), &values).unwrap()).unwrap();
        let m = find(&docs, monitor).unwrap();
        assert_eq!(m["metadata"]["namespace"], "monitoring", "{monitor}");
        assert_eq!(
            m["spec"]["namespaceSelector"]["matchNames"],
            serde_json::json!(["inferscope"]),
            "{monitor}: still scrapes the release namespace"
        );
        let ep = &m["spec"][endpoints][0];
        assert_eq!(ep["honorLabels"], false, "{monitor}");
        let relabelings = ep["relabelings"].as_array().unwrap();
        assert_eq!(
            relabelings.last().unwrap(),
            &serde_json::json!({"targetLabel": "cluster", "replacement": "east"}),
            "{monitor}: the user's come after the chart's"
        );
        assert_eq!(ep["metricRelabelings"][0]["action"], "drop", "{monitor}");
    }
}

/// The PrometheusRule's groups, by name.
fn rendered_rule_groups(values: &[&str]) -> Vec<Value> {
    let docs = yaml_docs(&template(&chart(), values).unwrap());
    find(&docs, "PrometheusRule").unwrap()["spec"]["groups"]
        .as_array()
        .unwrap()
        .clone()
}

fn rule<'a>(groups: &'a [Value], alert_or_record: &str, nth: usize) -> &'a Value {
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r["alert"] == alert_or_record || r["record"] == alert_or_record)
        .nth(nth)
        .unwrap_or_else(|| panic!("no rule {alert_or_record}"))
}

/// Rule files switch off one by one; thresholds and the runbook base URL are values; the
/// rules so rendered still pass promtool; and a rule file that no longer holds a threshold's
/// text fails the render instead of dropping the value.
#[test]
fn chart_rule_values() {
    let all = rendered_rule_groups(&[]);
    let no_cost = rendered_rule_groups(&["prometheusRule.files.inferscope-cost.enabled=false"]);
    assert!(no_cost.len() < all.len());
    assert!(
        no_cost
            .iter()
            .all(|g| !g["name"].as_str().unwrap().contains("cost")),
        "{no_cost:?}"
    );

    let groups = rendered_rule_groups(&[
        "prometheusRule.thresholds.ttftP95Seconds=1.5",
        "prometheusRule.thresholds.latencyP95Seconds=60",
        "prometheusRule.thresholds.gpuMemoryUsedRatio=0.9",
        "prometheusRule.thresholds.kvCacheUsageRatio=0.85",
        "prometheusRule.thresholds.sloLatencySeconds=10",
        "prometheusRule.thresholds.sloTtftSeconds=1",
        "prometheusRule.runbookBaseUrl=https://example.com/inferscope/",
    ]);
    let expr = |name: &str, nth: usize| {
        rule(&groups, name, nth)["expr"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let description = |name: &str| {
        rule(&groups, name, 0)["annotations"]["description"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(expr("LlmHighTimeToFirstToken", 0).ends_with("> 1.5"));
    assert!(description("LlmHighTimeToFirstToken").contains("above 1.5 s"));
    assert!(expr("LlmHighLatency", 0).ends_with("> 60"));
    assert!(expr("GpuMemoryNearlyFull", 0).ends_with("> 0.9"));
    assert!(description("GpuMemoryNearlyFull").contains("above 90 %"));
    assert!(expr("LlmKvCacheNearlyFull", 0).ends_with("> 0.85"));
    assert!(description("LlmKvCacheNearlyFull").contains("above 85 %"));
    let slo: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r["expr"].as_str().unwrap().contains("le=~"))
        .collect();
    assert!(slo.len() >= 10, "{slo:?}");
    for r in &slo {
        let e = r["expr"].as_str().unwrap();
        assert!(
            e.contains(r#"llm_latency_seconds_bucket{job="inferscope", le=~"10(\\.0)?"}"#)
                || e.contains(
                    r#"llm_time_to_first_token_seconds_bucket{job="inferscope", le=~"1(\\.0)?"}"#
                ),
            "{e}"
        );
    }
    assert!(description("LlmLatencySloFastBurn").contains("meet 10 s"));
    assert!(description("LlmTtftSloFastBurn").contains("meet 1 s"));
    let runbooks: Vec<&str> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["annotations"]["runbook_url"].as_str())
        .collect();
    assert!(runbooks.len() >= 20);
    for url in &runbooks {
        assert!(
            url.starts_with("https://example.com/inferscope/docs/runbooks.md#"),
            "{url}"
        );
    }
    // promtool takes the rendered rules.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, serde_json::json!({ "groups": groups }).to_string()).unwrap();
    tool("promtool", &["check", "rules", "rendered.yaml"], dir.path()).unwrap();

    // A rule file edited so that a threshold's text is gone: the render says which.
    let broken = broken_copy(
        "helm/inferscope/files/prometheus/inferscope-rules.yaml",
        "p95 TTFT above 2 s",
        "p95 TTFT too high",
    );
    let err = template(&broken.path().join("helm/inferscope"), &[]).unwrap_err();
    assert!(err.contains("p95 TTFT above 2 s"), "{err}");
}

// ---- Chart conventions ----

/// extraVolumes/extraVolumeMounts, image.digest, pod and container securityContext
/// (SELinux), the ServiceAccount token apart from rbac.create, the `helm test` pod and the
/// NetworkPolicy admitting it, Chart.yaml's metadata.
#[test]
fn chart_conventions() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let docs = validate_stream(
        &template(
            &chart(),
            &[
                "extraVolumes[0].name=otlp-tls",
                "extraVolumes[0].secret.secretName=otlp-tls",
                "extraVolumeMounts[0].name=otlp-tls",
                "extraVolumeMounts[0].mountPath=/etc/inferscope/otlp",
                "extraVolumeMounts[0].readOnly=true",
                &format!("image.digest={digest}"),
                "podSecurityContext.seLinuxOptions.type=spc_t",
                "securityContext.seLinuxOptions.level=s0",
                "rbac.create=false",
                "helmTest.enabled=true",
                "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let ds = find(&docs, "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    let c = daemonset_container(&docs);
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "otlp-tls" && v["secret"]["secretName"] == "otlp-tls"),
        "{pod}"
    );
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "otlp-tls" && m["mountPath"] == "/etc/inferscope/otlp"),
        "{c}"
    );
    assert_eq!(
        c["image"],
        format!("ghcr.io/inferscope/inferscope@{digest}")
    );
    assert_eq!(pod["securityContext"]["seLinuxOptions"]["type"], "spc_t");
    assert_eq!(c["securityContext"]["seLinuxOptions"]["level"], "s0");
    assert_eq!(
        c["securityContext"]["appArmorProfile"]["type"],
        "Unconfined"
    );
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "rbac.create=false"
    );
    assert!(find(&docs, "ClusterRole").is_none());

    let test_pod = docs
        .iter()
        .find(|d| kind(d) == "Pod")
        .expect("helm test pod");
    assert_eq!(test_pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let command = strings(&test_pod["spec"]["containers"][0]["command"]);
    assert_eq!(
        command.last().unwrap(),
        &"http://inferscope.inferscope.svc:9464/healthz"
    );
    // The Service must not take the test pod for an agent.
    let svc = find(&docs, "Service").unwrap();
    let selector = svc["spec"]["selector"].as_object().unwrap();
    assert!(
        selector
            .iter()
            .any(|(k, v)| test_pod["metadata"]["labels"][k] != *v),
        "{test_pod}"
    );
    let np = find(&docs, "NetworkPolicy").unwrap();
    let from = np["spec"]["ingress"][0]["from"].as_array().unwrap();
    assert!(
        from.iter().any(|p| p["podSelector"]["matchLabels"]
            .as_object()
            .is_some_and(|l| l
                .iter()
                .all(|(k, v)| test_pod["metadata"]["labels"][k] == *v))),
        "the policy admits the test pod: {np}"
    );
    assert!(
        yaml_docs(&template(&chart(), &["helmTest.enabled=false"]).unwrap())
            .iter()
            .all(|d| kind(d) != "Pod"),
        "no test pod with helmTest.enabled=false"
    );
    // deploy/manifests/ is for `kubectl apply`, which would run a hook as a plain pod.
    assert!(
        manifests::render("helm", &chart())
            .unwrap()
            .values()
            .flat_map(|text| yaml_docs(text))
            .all(|d| kind(&d) != "Pod"),
        "the test pod in deploy/manifests/"
    );

    let no_token =
        yaml_docs(&template(&chart(), &["serviceAccount.automountToken=false"]).unwrap());
    assert_eq!(
        find(&no_token, "DaemonSet").unwrap()["spec"]["template"]["spec"]
            ["automountServiceAccountToken"],
        false
    );
    assert_eq!(
        find(&no_token, "ServiceAccount").unwrap()["automountServiceAccountToken"],
        false
    );
    assert!(
        find(&no_token, "ClusterRole").is_some(),
        "rbac.create stays"
    );

    let err = template(&chart(), &["securityContext.privileged=true"]).unwrap_err();
    assert!(err.contains("securityContext.privileged"), "{err}");

    let meta = &yaml_docs(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())[0];
    assert!(
        meta["home"].as_str().unwrap().starts_with("https://"),
        "{meta}"
    );
    assert!(!strings(&meta["sources"]).is_empty(), "{meta}");
    assert!(!strings(&meta["keywords"]).is_empty(), "{meta}");
}

/// values.schema.json refuses values of the wrong type or shape before any template runs;
/// without the schema the same values render.
#[test]
fn chart_schema_refuses_bad_values() {
    let bad: &[&str] = &[
        "metrics.port=http",
        "nvidia.preset=arch",
        "image.digest=latest",
        "serviceMonitor.honorLabels=yes",
        "prometheusRule.thresholds.gpuMemoryUsedRatio=95",
        "agent.watchPorts={vllm}",
        "nodeSelectr.pool=gpu",
    ];
    for value in bad {
        let err = template(&chart(), &[value]).unwrap_err();
        assert!(
            err.contains("schema") || err.contains("at '"),
            "{value}: {err}"
        );
    }
    let unchecked = tempfile::tempdir().unwrap();
    let copy = unchecked.path().join("inferscope");
    copy_tree(&chart(), &copy);
    std::fs::remove_file(copy.join("values.schema.json")).unwrap();
    template(
        &copy,
        &["serviceMonitor.honorLabels=yes", "nodeSelectr.pool=gpu"],
    )
    .unwrap();
}
