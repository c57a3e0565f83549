//! Reading the agent's forensic reports back through `inferscope forensics`, and the request
//! that makes the OpenAI stand-in fail a CUDA allocation.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;

use crate::{bin, eventually, Agent};

pub fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("inferscope"))
        .arg("forensics")
        .args(args)
        .arg("--forensics-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn list(dir: &Path) -> Vec<Value> {
    let (ok, out, err) = cli(dir, &["list", "--format", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

pub fn show(dir: &Path, id: &str) -> Value {
    let (ok, out, err) = cli(dir, &["show", id, "--format", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits for `n` reports in the agent's forensics directory and returns them, newest first.
pub fn reports(agent: &Agent, n: usize) -> Vec<Value> {
    let dir = agent.dir.path().join("forensics");
    eventually("the forensic reports", Duration::from_secs(20), || {
        let l = if dir.exists() { list(&dir) } else { Vec::new() };
        (l.len() >= n).then_some(l)
    })
}

/// A raw HTTP/1.1 request on a connection of its own; returns the response's status line.
pub fn request(port: u16, headers: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer.lines().next().unwrap_or_default().to_string()
}
