//! The commands the operator docs tell people to paste work against what is shipped: every
//! `kubectl exec` runs the binary at the path the image puts it (read from deploy/Dockerfile,
//! whose runtime image is distroless: no shell, nothing on `PATH`), in a pod picked by node
//! rather than `ds/…` (which lands on an arbitrary node, away from its reports), and every
//! `inferscope` subcommand and flag those docs use is one the real binary accepts. The systemd
//! quickstart's unit and config load too. Not root: this runs in the ordinary tier.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use inferscope::config::{Config, Overrides};

/// The docs whose `kubectl exec` and `inferscope` commands are checked.
const DOCS: &[&str] = &[
    "docs/runbooks.md",
    "docs/troubleshooting.md",
    "docs/install.md",
    "docs/quickstart-systemd.md",
];

/// `kubectl exec` targets that pick an arbitrary pod of a workload.
const WORKLOAD_TARGETS: &[&str] = &[
    "ds/",
    "daemonset/",
    "daemonsets/",
    "daemonset.apps/",
    "deploy/",
    "deployment/",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The agent's path in the runtime image: the first element of the last stage's ENTRYPOINT,
/// which a COPY of that stage must also name as its destination (else the path is a promise
/// the image does not keep).
fn image_binary(dockerfile: &str) -> Result<String, String> {
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .ok_or("no FROM")?;
    let stage = &lines[last_from..];
    let entry = stage
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("ENTRYPOINT"))
        .ok_or("the runtime stage has no ENTRYPOINT")?;
    let argv: Vec<String> = serde_json::from_str(entry.trim())
        .map_err(|e| format!("ENTRYPOINT is not the exec (JSON) form: {e}"))?;
    let program = argv.first().ok_or("empty ENTRYPOINT")?.clone();
    let copied = stage.iter().any(|l| {
        l.to_ascii_uppercase().starts_with("COPY ")
            && l.split_whitespace().last() == Some(program.as_str())
    });
    if !copied {
        return Err(format!(
            "ENTRYPOINT runs {program}, which no COPY of the runtime stage puts there"
        ));
    }
    Ok(program)
}

/// Shell commands of a Markdown text: the lines of fenced blocks (continuations joined,
/// comments cut) and inline code spans (which prose wraps across lines).
fn commands(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut prose = String::new();
    let mut fenced: Option<String> = None;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = match fenced {
                Some(pending) => {
                    if !pending.trim().is_empty() {
                        out.push(pending);
                    }
                    None
                }
                None => Some(String::new()),
            };
            continue;
        }
        match fenced.as_mut() {
            Some(pending) => {
                let code = line.split(" # ").next().unwrap_or("").trim_end();
                if let Some(head) = code.strip_suffix('\\') {
                    pending.push_str(head);
                    pending.push(' ');
                } else {
                    pending.push_str(code);
                    out.push(std::mem::take(pending));
                }
            }
            None => {
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    let mut spans = prose.split('`');
    spans.next();
    while let Some(span) = spans.next() {
        out.push(span.replace('\n', " "));
        spans.next();
    }
    out
}

fn tokens(command: &str) -> Vec<String> {
    command
        .split_whitespace()
        .map(|t| t.trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect()
}

fn is_shell_operator(t: &str) -> bool {
    matches!(t, "|" | "||" | "&&" | ";" | "&" | ")" | "2>&1")
        || t.starts_with('>')
        || t.starts_with("2>")
}

/// `--help` of the real binary, per subcommand path, run once each.
struct Cli {
    bin: PathBuf,
    help: HashMap<Vec<String>, String>,
}

impl Cli {
    fn new(bin: PathBuf) -> Self {
        Cli {
            bin,
            help: HashMap::new(),
        }
    }

    fn help(&mut self, path: &[String]) -> &str {
        let bin = self.bin.clone();
        self.help.entry(path.to_vec()).or_insert_with(|| {
            let out = Command::new(&bin)
                .args(path)
                .arg("--help")
                .output()
                .expect("run the agent binary");
            assert!(
                out.status.success(),
                "{} {} --help: {}",
                bin.display(),
                path.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).expect("UTF-8 help")
        })
    }

    fn subcommands(&mut self, path: &[String]) -> Vec<String> {
        let help = self.help(path);
        let mut lines = help.lines().skip_while(|l| l.trim() != "Commands:");
        lines.next();
        lines
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect()
    }

    /// Whether `args` (what follows the binary) is a command line the binary accepts: known
    /// subcommands, known flags, and for flags with a closed set of values, one of them.
    fn check(&mut self, args: &[String]) -> Result<(), String> {
        let mut path: Vec<String> = Vec::new();
        let mut rest = args.iter().peekable();
        while let Some(next) = rest.peek() {
            let subs = self.subcommands(&path);
            if subs.is_empty() || next.starts_with('-') {
                break;
            }
            if !subs.contains(next) {
                return Err(format!(
                    "`{} {next}`: no such subcommand (the binary has: {})",
                    path.join(" "),
                    subs.join(", ")
                ));
            }
            path.push(rest.next().unwrap().clone());
        }
        if path.is_empty() {
            return Err("no subcommand".into());
        }
        if !self.subcommands(&path).is_empty() {
            return Err(format!("`{}` needs a subcommand", path.join(" ")));
        }
        let help = self.help(&path).to_string();
        while let Some(arg) = rest.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            let Some(block) = option_block(&help, name) else {
                return Err(format!("`{}` has no flag --{name}", path.join(" ")));
            };
            if let Some(values) = possible_values(&block) {
                let value = inline.or_else(|| rest.next().cloned()).unwrap_or_default();
                if !values.contains(&value) {
                    return Err(format!(
                        "`{} --{name} {value}`: not one of {}",
                        path.join(" "),
                        values.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The help text of one option: its line and the lines up to the next option.
fn option_block(help: &str, name: &str) -> Option<String> {
    let wanted = format!("--{name}");
    let mut lines = help.lines().skip_while(|l| {
        let t = l.trim_start();
        !(t.starts_with('-')
            && t.split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|w| w == wanted))
    });
    let first = lines.next()?;
    let mut block = first.to_string();
    for l in lines.take_while(|l| !l.trim_start().starts_with('-')) {
        block.push(' ');
        block.push_str(l.trim());
    }
    Some(block)
}

fn possible_values(block: &str) -> Option<Vec<String>> {
    let (_, after) = block.split_once("[possible values: ")?;
    let (list, _) = after.split_once(']')?;
    Some(list.split(", ").map(str::to_string).collect())
}

/// Every problem with the `kubectl exec` and `inferscope` commands of one doc.
fn problems(doc: &str, image_bin: &str, cli: &mut Cli) -> Vec<String> {
    let mut found = Vec::new();
    for command in commands(doc) {
        let t = tokens(&command);
        if let Some(kubectl) = t.iter().position(|w| w == "kubectl") {
            if let Some(exec) = t[kubectl..].iter().position(|w| w == "exec") {
                check_exec(
                    &command,
                    &t[kubectl + exec + 1..],
                    image_bin,
                    cli,
                    &mut found,
                );
                continue;
            }
        }
        // The binary run directly (the systemd quickstart): `inferscope <subcommand> …`.
        for (i, w) in t.iter().enumerate() {
            let named = Path::new(w).file_name().is_some_and(|f| f == "inferscope");
            let Some(next) = t.get(i + 1) else { continue };
            if !named || !cli.subcommands(&[]).contains(next) {
                continue;
            }
            let args: Vec<String> = t[i + 1..]
                .iter()
                .take_while(|w| !is_shell_operator(w))
                .cloned()
                .collect();
            if let Err(e) = cli.check(&args) {
                found.push(format!("`{command}`: {e}"));
            }
        }
    }
    found
}

fn check_exec(
    command: &str,
    after_exec: &[String],
    image_bin: &str,
    cli: &mut Cli,
    found: &mut Vec<String>,
) {
    let Some(dashes) = after_exec.iter().position(|w| w == "--") else {
        found.push(format!(
            "`{command}`: no `--` before the command (kubectl exec needs it)"
        ));
        return;
    };
    let mut target = None;
    let mut words = after_exec[..dashes].iter();
    while let Some(w) = words.next() {
        if matches!(w.as_str(), "-c" | "--container" | "-n" | "--namespace") {
            words.next();
        } else if !w.starts_with('-') && target.is_none() {
            target = Some(w.clone());
        }
    }
    match target {
        None => found.push(format!("`{command}`: no pod named")),
        Some(t) if WORKLOAD_TARGETS.iter().any(|p| t.starts_with(p)) => found.push(format!(
            "`{command}`: `{t}` picks an arbitrary pod; pick the node's pod by spec.nodeName"
        )),
        Some(_) => {}
    }
    let argv: Vec<String> = after_exec[dashes + 1..]
        .iter()
        .take_while(|w| !is_shell_operator(w))
        .cloned()
        .collect();
    match argv.first() {
        None => found.push(format!("`{command}`: no command after `--`")),
        Some(program) if program != image_bin => found.push(format!(
            "`{command}`: runs `{program}`, but the image (deploy/Dockerfile) has only \
             {image_bin}: no shell, no PATH lookup"
        )),
        Some(_) => {
            if let Err(e) = cli.check(&argv[1..]) {
                found.push(format!("`{command}`: {e}"));
            }
        }
    }
}

#[test]
fn the_image_binary_is_read_from_the_dockerfile() {
    assert_eq!(
        image_binary(&read("deploy/Dockerfile")).unwrap(),
        "/inferscope"
    );
    let moved = "FROM a AS b\nRUN x\nFROM gcr.io/distroless/cc\nCOPY --from=b /src/x /usr/bin/x\nENTRYPOINT [\"/inferscope\", \"run\"]\n";
    assert!(image_binary(moved).is_err(), "an ENTRYPOINT nothing copies");
}

#[test]
fn every_kubectl_exec_and_inferscope_command_in_the_docs_works() {
    let image_bin = image_binary(&read("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut cli = Cli::new(integration::bin("inferscope"));
    let mut all = Vec::new();
    let mut execs = 0;
    for rel in DOCS {
        let doc = read(rel);
        execs += commands(&doc)
            .iter()
            .filter(|c| c.contains("kubectl") && c.contains(" exec "))
            .count();
        all.extend(
            problems(&doc, &image_bin, &mut cli)
                .into_iter()
                .map(|p| format!("{rel}: {p}")),
        );
    }
    assert!(
        execs >= 5,
        "the docs lost their kubectl exec recipes ({execs} found)"
    );
    assert!(
        all.is_empty(),
        "commands that fail as written:\n{}",
        all.join("\n")
    );
}

#[test]
fn the_checks_catch_the_broken_recipes() {
    let image_bin = image_binary(&read("deploy/Dockerfile")).unwrap();
    let mut cli = Cli::new(integration::bin("inferscope"));
    let broken = [
        "`kubectl -n inferscope exec ds/inferscope -- inferscope forensics list`",
        "```sh\nkubectl -n inferscope exec ds/inferscope -- /inferscope forensics list\n```",
        "prose `kubectl -n inferscope exec <pod> -- inferscope\nforensics list` wrapped",
        "`kubectl -n inferscope exec $POD -- /inferscope forensics lst`",
        "`kubectl -n inferscope exec $POD -- /inferscope forensics show ID --format pdf`",
        "`kubectl -n inferscope exec $POD -- /inferscope forensics show ID --output html`",
        "`kubectl -n inferscope exec $POD -- ls /usr/local/nvidia/lib64`",
        "`kubectl -n inferscope exec $POD /inferscope forensics list`",
        "```sh\nsudo inferscope forensics show ID --html > r.html\n```",
    ];
    for doc in broken {
        assert!(
            !problems(doc, &image_bin, &mut cli).is_empty(),
            "not caught: {doc}"
        );
    }
    let fine = "```sh\nkubectl -n inferscope exec $POD -- /inferscope forensics show ID \\\n  --format html > report.html  # the page\n```\n`kubectl -n inferscope exec -c agent pod/x --\n/inferscope forensics list --format=json`";
    assert_eq!(problems(fine, &image_bin, &mut cli), Vec::<String>::new());
}

/// The unit's ExecStart is a command line the binary accepts, its config file is the one the
/// quickstart installs, and that file loads with the agent's own loader.
#[test]
fn the_systemd_unit_and_its_config_load() {
    let unit = read("deploy/systemd/inferscope.service");
    let mut exec = String::new();
    let mut lines = unit.lines();
    while let Some(l) = lines.next() {
        if let Some(start) = l.strip_prefix("ExecStart=") {
            exec.push_str(start);
            while exec.ends_with('\\') {
                exec.pop();
                exec.push_str(lines.next().expect("continued ExecStart"));
            }
        }
    }
    let argv = tokens(&exec);
    assert_eq!(argv[0], "/usr/local/bin/inferscope", "{exec}");
    let mut cli = Cli::new(integration::bin("inferscope"));
    cli.check(&argv[1..])
        .unwrap_or_else(|e| panic!("ExecStart: {e}"));
    let config = argv
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("ExecStart passes --config");
    let quickstart = read("docs/quickstart-systemd.md");
    assert!(
        quickstart.contains(&format!("deploy/systemd/config.toml {config}")),
        "the quickstart installs the config where the unit reads it ({config})"
    );
    assert!(
        quickstart.contains("deploy/systemd/inferscope.service /etc/systemd/system/"),
        "the quickstart installs the unit"
    );

    let loaded = Config::load(
        Some(&repo_root().join("deploy/systemd/config.toml")),
        &NoEnv,
        &Overrides::default(),
    )
    .unwrap_or_else(|e| panic!("deploy/systemd/config.toml: {e:#}"));
    assert_eq!(loaded.prometheus_listen.to_string(), "127.0.0.1:9464");
}

struct NoEnv;

impl inferscope::env::EnvSource for NoEnv {
    fn vars(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}
