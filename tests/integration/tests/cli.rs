//! The agent's command line: start-up errors are one clear line and a non-zero exit.

use std::process::Command;

use integration::*;

fn run_agent(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin("inferscope"))
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run inferscope");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_config_is_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[probes]\nstack_sample_evry = 3\n").unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--config", file.to_str().unwrap()],
            vec![],
            "stack_sample_evry",
        ),
        (
            vec!["--config", "/nonexistent/inferscope.toml"],
            vec![],
            "cannot read config file",
        ),
        (
            vec![],
            vec![("INFERSCOPE_PROBES__RING_BUFFER_BYTES", "1000")],
            "ring_buffer_bytes",
        ),
        (
            vec!["--disable-probe", "cuNoSuchThing"],
            vec![],
            "cuNoSuchThing",
        ),
    ];
    for (args, env, needle) in cases {
        let mut args = args;
        args.extend(["--prometheus-listen", &listen]);
        let (code, stderr) = run_agent(&args, &env);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "not one line: {stderr}");
        assert!(
            lines[0].starts_with("inferscope: ") && lines[0].contains(needle),
            "{stderr}"
        );
    }
}

#[test]
fn not_root_is_refused_with_a_reason() {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let out = if root {
        // Drop to nobody for this one run.
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("inferscope"))
            .args(["run", "--prometheus-listen", &listen])
            .output()
            .expect("setpriv (util-linux)")
    } else {
        Command::new(bin("inferscope"))
            .args(["run", "--prometheus-listen", &listen])
            .output()
            .unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("must run as root"),
        "{stderr}"
    );
}

#[root_test]
fn a_listener_address_in_use_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_agent(&["--prometheus-listen", &listen], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&listen),
        "{stderr}"
    );
}
