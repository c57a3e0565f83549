//! The command line as the docs tell it against the binary's own `--help`, in both
//! directions: every flag of every subcommand is in docs/configuration.md's "Command line",
//! and every `inferscope <command> --flag` the docs (and the README) write exists. The
//! metric, label and config-key checks are unit tests of the agent (`agent/src/agent/docs_tests.rs`),
//! where the registry and the config structs are at hand.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use integration::bin;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn help(command: &[String]) -> String {
    let out = Command::new(bin("inferscope"))
        .args(command)
        .arg("--help")
        .output()
        .expect("run inferscope --help");
    assert!(out.status.success(), "{command:?} --help failed");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// `--name` words of `text`.
fn flags_in(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.len() > 2 && w.starts_with("--") && w.as_bytes()[2].is_ascii_lowercase())
}

/// Every leaf command (`run`, `forensics list`, ...) with its flags, from `--help` down the
/// subcommands clap lists.
fn code_commands() -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(command) = todo.pop() {
        let text = help(&command);
        let mut subcommands = Vec::new();
        let mut section = "";
        let mut flags = BTreeSet::new();
        for line in text.lines() {
            if !line.starts_with(' ') {
                section = line;
                continue;
            }
            let word = line.split_whitespace().next().unwrap_or("");
            match section {
                "Commands:" if word != "help" => subcommands.push(word.to_string()),
                "Options:" => {
                    if let Some(flag) = flags_in(line).next() {
                        if flag != "--help" && flag != "--version" {
                            flags.insert(flag.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        if subcommands.is_empty() {
            out.insert(command.join(" "), flags);
        } else {
            for s in subcommands {
                let mut c = command.clone();
                c.push(s);
                todo.push(c);
            }
        }
    }
    out
}

/// docs/configuration.md's "Command line": a line naming `` `inferscope <command> ...` ``
/// (one or more) and then one `` - `--flag ...` `` line per flag.
fn doc_commands() -> BTreeMap<String, BTreeSet<String>> {
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let section = page
        .split("\n## Command line\n")
        .nth(1)
        .expect("docs/configuration.md has a `## Command line` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = Vec::new();
    for line in section.lines() {
        if let Some(item) = line.strip_prefix("- `") {
            assert!(!current.is_empty(), "a flag before its command: {line}");
            let flag = flags_in(item).next().expect("a flag");
            for c in &current {
                if let Some(flags) = out.get_mut(c) {
                    flags.insert(flag.to_string());
                }
            }
        } else if line.starts_with("`inferscope ") {
            current = line
                .split('`')
                .skip(1)
                .step_by(2)
                .filter_map(|span| span.strip_prefix("inferscope "))
                .map(|c| {
                    // `show ID`: the argument is not part of the command.
                    c.split_whitespace()
                        .take_while(|w| w.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            for c in &current {
                out.entry(c.clone()).or_default();
            }
        }
    }
    out
}

#[test]
fn every_flag_of_every_command_is_documented_and_no_other() {
    let code = code_commands();
    assert!(code.contains_key("run"), "{code:?}");
    assert_eq!(
        doc_commands(),
        code,
        "docs/configuration.md's `Command line` (left) against `inferscope --help` (right)"
    );
}

/// Which command an `inferscope ...` in the docs runs, and the flags written after it.
fn invocations(text: &str, commands: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        // In prose only code spans are commands; a code block's line is one.
        let chunks: Vec<&str> = if in_block {
            vec![line]
        } else {
            line.split('`').skip(1).step_by(2).collect()
        };
        for chunk in chunks {
            for (at, _) in chunk.match_indices("inferscope ") {
                if at > 0 && !chunk[..at].ends_with([' ', '/', '(']) {
                    continue;
                }
                let rest = &chunk[at + "inferscope ".len()..];
                let Some(command) = commands
                    .iter()
                    .filter(|c| rest == **c || rest.starts_with(&format!("{c} ")))
                    .max_by_key(|c| c.len())
                else {
                    continue;
                };
                let args = rest[command.len()..]
                    .split_whitespace()
                    .take_while(|w| !matches!(*w, "|" | "&&" | "||" | ";" | ">" | "2>&1"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let flags = flags_in(&args).map(String::from).collect();
                out.push((command.to_string(), flags));
            }
        }
    }
    out
}

#[test]
fn every_flag_the_docs_give_inferscope_exists() {
    let code = code_commands();
    let commands: Vec<&str> = code.keys().map(String::as_str).collect();
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.push(root().join("README.md"));
    let mut unknown = Vec::new();
    let mut seen = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (command, flags) in invocations(&text, &commands) {
            seen += 1;
            // Every command has these; the Command line section leaves them out.
            let known =
                |f: &String| code[&command].contains(f) || f == "--help" || f == "--version";
            for flag in flags.iter().filter(|f| !known(f)) {
                unknown.push(format!(
                    "{}: `inferscope {command} {flag}`",
                    page.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    // The `# --flag` notes of the TOML block name `run`'s flags.
    let config = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let block = config
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a TOML block");
    for flag in flags_in(block).filter(|f| !code["run"].contains(*f)) {
        unknown.push(format!("configuration.md's TOML block: `{flag}`"));
    }
    assert!(
        seen > 5,
        "found {seen} invocations of inferscope in the docs"
    );
    assert!(
        unknown.is_empty(),
        "flags the docs give inferscope that it does not have:\n{}",
        unknown.join("\n")
    );
}
