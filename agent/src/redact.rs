//! Secrets out of the text processes hand the agent (command lines, names, symbols) before
//! it is kept, exported or printed. Pure functions on strings, no I/O; used wherever such
//! text enters the agent (forensics, server discovery).
//!
//! A secret here is:
//! - the value of an option whose name says so: `--api-key X`, `--api-key=X`, `--token`,
//!   `--hf-token`, and any option whose name ends in `key` or holds `token`, `secret`,
//!   `password` or `passwd` (case and `-`/`_` alike). `tokens`, `tokenizer` and `token-id`
//!   are not secret words: `--max-tokens 512` and `--tokenizer m` stay;
//! - `NAME=value` with such a name (`HF_TOKEN=…`, `OPENAI_API_KEY=…`, `DB_PASSWORD=…`), as
//!   `env` and `docker run -e` put it on a command line;
//! - the password of a URL (`https://user:***@host`), or the whole user part when it has no
//!   password (`https://***@host`: a token used as the user name);
//! - the word after `Bearer` (or after `Authorization:` and its scheme) and after a header
//!   whose name is secret (`X-Api-Key: …`).
//!
//! A value is replaced whole by [`MASK`], so a later truncation cannot leave a prefix of it.

/// What stands in for a secret.
pub const MASK: &str = "***";

/// A command line's arguments with their secrets masked. The value of a secret option is the
/// next argument whole, spaces and all; a next argument that starts with `--` is taken for
/// the next option (a secret option given last, or without its value, masks nothing).
pub fn argv(args: &[String]) -> Vec<String> {
    let mut r = Redactor::default();
    args.iter()
        .map(|a| {
            if std::mem::take(&mut r.next) == Next::Secret && !a.starts_with("--") {
                return MASK.to_string();
            }
            if let Some(masked) = assignment(a) {
                return masked;
            }
            let mut out = String::with_capacity(a.len());
            r.feed(a, &mut out);
            out
        })
        .collect()
}

/// Free text (a command line joined with spaces, a process name, a symbol) with its secrets
/// masked, word by word; whitespace is kept as it was.
pub fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    Redactor::default().feed(s, &mut out);
    out
}

/// What the previous word says about the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Next {
    #[default]
    Plain,
    /// The next word is a secret (after `--api-key`, `Bearer`).
    Secret,
    /// After `Authorization:`: a scheme and a secret, or a secret alone.
    AuthScheme,
}

#[derive(Default)]
struct Redactor {
    next: Next,
}

impl Redactor {
    fn feed(&mut self, s: &str, out: &mut String) {
        let mut rest = s;
        while !rest.is_empty() {
            let start = rest
                .find(|c: char| !c.is_whitespace())
                .unwrap_or(rest.len());
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if end > 0 {
                self.word(&rest[..end], out);
            }
            rest = &rest[end..];
        }
    }

    /// One word without whitespace.
    fn word(&mut self, w: &str, out: &mut String) {
        match std::mem::take(&mut self.next) {
            Next::Secret if !w.starts_with("--") => {
                out.push_str(MASK);
                return;
            }
            Next::AuthScheme if is_auth_scheme(w) => {
                out.push_str(w);
                self.next = Next::Secret;
                return;
            }
            Next::AuthScheme if !w.starts_with("--") => {
                out.push_str(MASK);
                return;
            }
            _ => {}
        }
        if let Some(masked) = assignment(w) {
            out.push_str(&masked);
            return;
        }
        let flag = w.trim_start_matches('-');
        if flag.len() < w.len() {
            match flag.split_once('=') {
                // `--option=value` with a name that is not secret: the value may still be
                // `NAME=secret`, a URL, `Authorization:`.
                Some((_, value)) => {
                    out.push_str(&w[..w.len() - value.len()]);
                    self.word(value, out);
                }
                None => {
                    out.push_str(w);
                    if is_name(flag) && secret_name(flag) {
                        self.next = Next::Secret;
                    }
                }
            }
            return;
        }
        let lower = w.to_ascii_lowercase();
        if lower == "bearer" || lower.ends_with(":bearer") {
            out.push_str(w);
            self.next = Next::Secret;
            return;
        }
        if lower.ends_with("authorization:") {
            out.push_str(w);
            self.next = Next::AuthScheme;
            return;
        }
        if let Some(name) = w.strip_suffix(':') {
            if is_name(name) && secret_name(name) {
                out.push_str(w);
                self.next = Next::Secret;
                return;
            }
        }
        out.push_str(&url_credentials(w));
    }
}

/// `--name=value` or `NAME=value` with a secret name: everything after the `=` masked.
fn assignment(w: &str) -> Option<String> {
    let (name, value) = w.trim_start_matches('-').split_once('=')?;
    if value.is_empty() || !is_name(name) || !secret_name(name) {
        return None;
    }
    Some(format!("{}{MASK}", &w[..w.len() - value.len()]))
}

/// An option or variable name: letters, digits, `-`, `_`, `.`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether an option, variable or header name says its value is secret.
fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n.ends_with("key")
        || n.ends_with("keys")
        || n.contains("secret")
        || n.contains("password")
        || n.contains("passwd")
    {
        return true;
    }
    // `token`, but not `tokens`, `tokenizer`/`tokenize`/`tokenise`, `token_ids`.
    n.match_indices("token").any(|(i, _)| {
        let rest = &n[i + "token".len()..];
        !["s", "iz", "is", "_id", "-id"]
            .iter()
            .any(|p| rest.starts_with(p))
    })
}

fn is_auth_scheme(w: &str) -> bool {
    ["bearer", "basic", "token", "digest", "negotiate", "apikey"]
        .iter()
        .any(|s| w.eq_ignore_ascii_case(s))
}

/// `scheme://user:pass@host` → `scheme://user:***@host`; `scheme://token@host` →
/// `scheme://***@host`; every URL in the word (`a://…,b://…`).
fn url_credentials(w: &str) -> String {
    let mut out = String::with_capacity(w.len());
    let mut rest = w;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query or fragment; its user part at its last `@`.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                match tail[..at].split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(MASK),
                }
                out.push('@');
                rest = &tail[at + 1..];
            }
            // No credentials: go on from here, the next URL may start inside this stretch.
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn secret_options_lose_their_values_in_both_forms() {
        assert_eq!(
            argv(&args(&[
                "vllm",
                "serve",
                "org/model",
                "--api-key",
                "sk-123",
                "--port",
                "8000",
                "--token=hf_abc",
                "--hf-token",
                "hf_def",
            ])),
            args(&[
                "vllm",
                "serve",
                "org/model",
                "--api-key",
                MASK,
                "--port",
                "8000",
                "--token=***",
                "--hf-token",
                MASK,
            ])
        );
        assert_eq!(
            text("server --api-key sk-123 --api-key=sk-456 --port 8000"),
            "server --api-key *** --api-key=*** --port 8000"
        );
    }

    #[test]
    fn generic_secret_option_names() {
        for flag in [
            "--openai-api-key",
            "--apikey",
            "--API_KEY",
            "--ssl-private-key",
            "--client-secret",
            "--secret-file",
            "--db-password",
            "--passwd",
            "--auth-token",
            "--use-auth-token",
            "--token-file",
            "-token",
            "--access-keys",
        ] {
            assert_eq!(
                argv(&args(&["x", flag, "s3cr3t"])),
                args(&["x", flag, MASK]),
                "{flag}"
            );
            assert_eq!(
                text(&format!("x {flag}=s3cr3t y")),
                format!("x {flag}=*** y"),
                "{flag}"
            );
        }
    }

    #[test]
    fn options_that_merely_look_alike_are_kept() {
        let a = args(&[
            "text-generation-launcher",
            "--max-tokens",
            "512",
            "--max-total-tokens=4096",
            "--tokenizer",
            "org/tok",
            "--tokenizer-name=org/tok",
            "--skip-tokenizer-init",
            "--return-tokens-as-token-ids",
            "--model-id",
            "org/m",
            "--keyfile-path",
            "/etc/k",
            "MAX_TOKENS=7",
            "-m",
            "vllm.entrypoints.openai.api_server",
        ]);
        assert_eq!(argv(&a), a);
        let line = a.join(" ");
        assert_eq!(text(&line), line);
    }

    #[test]
    fn a_secret_option_last_or_without_value_masks_nothing_else() {
        assert_eq!(argv(&args(&["x", "--api-key"])), args(&["x", "--api-key"]));
        assert_eq!(text("x --api-key"), "x --api-key");
        assert_eq!(text("x --api-key="), "x --api-key=");
        // Followed by another option: that option is not the secret.
        assert_eq!(
            argv(&args(&["x", "--api-key", "--port", "8000"])),
            args(&["x", "--api-key", "--port", "8000"])
        );
        assert_eq!(text("x --token --port 8000"), "x --token --port 8000");
    }

    #[test]
    fn an_argument_is_masked_whole_spaces_and_all() {
        assert_eq!(
            argv(&args(&["x", "--api-key", "two words", "--token=a b", "y"])),
            args(&["x", "--api-key", MASK, "--token=***", "y"])
        );
        assert_eq!(
            argv(&args(&["x", "--api-key", ""])),
            args(&["x", "--api-key", MASK])
        );
    }

    #[test]
    fn environment_assignments() {
        assert_eq!(
            text("env HF_TOKEN=hf_1 OPENAI_API_KEY=sk-2 db_password=p3 AWS_SECRET_ACCESS_KEY=a4 PATH=/bin python serve.py"),
            "env HF_TOKEN=*** OPENAI_API_KEY=*** db_password=*** AWS_SECRET_ACCESS_KEY=*** PATH=/bin python serve.py"
        );
        assert_eq!(
            argv(&args(&[
                "docker",
                "run",
                "-e",
                "HUGGING_FACE_HUB_TOKEN=x y",
                "img"
            ])),
            args(&["docker", "run", "-e", "HUGGING_FACE_HUB_TOKEN=***", "img"])
        );
        assert_eq!(
            text("--env=HF_TOKEN=abc -Dspring.datasource.password=pw"),
            "--env=HF_TOKEN=*** -Dspring.datasource.password=***"
        );
        assert_eq!(text("Key=v A=B"), "Key=*** A=B");
    }

    #[test]
    fn urls_with_credentials() {
        assert_eq!(
            text("--model https://user:pa55@example.com/org/m?x=1"),
            "--model https://user:***@example.com/org/m?x=1"
        );
        assert_eq!(
            text("git+https://ghp_token123@github.com/o/r.git"),
            "git+https://***@github.com/o/r.git"
        );
        assert_eq!(
            text("--proxies=http://a:b@p1:3128,http://p2,socks5://c:d@p3"),
            "--proxies=http://a:***@p1:3128,http://p2,socks5://c:***@p3"
        );
        assert_eq!(
            text("redis://:onlypass@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        // No credentials, or an `@` only in the path: unchanged.
        for s in [
            "https://example.com/a@b",
            "https://huggingface.co/org/m",
            "user@host:path",
            "://",
        ] {
            assert_eq!(text(s), s);
        }
    }

    #[test]
    fn bearer_tokens_and_secret_headers() {
        assert_eq!(
            text("curl -H Authorization: Bearer eyJhbGciOi.x.y http://h"),
            "curl -H Authorization: Bearer *** http://h"
        );
        assert_eq!(
            argv(&args(&[
                "curl",
                "-H",
                "Authorization: Bearer abc",
                "-H",
                "X-Api-Key: k1"
            ])),
            args(&[
                "curl",
                "-H",
                "Authorization: Bearer ***",
                "-H",
                "X-Api-Key: ***"
            ])
        );
        assert_eq!(text("authorization: rawtoken"), "authorization: ***");
        assert_eq!(text("Authorization:Bearer abc"), "Authorization:Bearer ***");
        assert_eq!(text("bearer abc def"), "bearer *** def");
    }

    #[test]
    fn unicode_is_kept_and_masked_whole() {
        assert_eq!(
            text("modèle --api-key пароль-ключ --name 模型 ПАРОЛЬ=x"),
            "modèle --api-key *** --name 模型 ПАРОЛЬ=x"
        );
        assert_eq!(text("--clé_password=sécrét"), "--clé_password=***");
        assert_eq!(text("https://ü:pässwörd@hôst/ä"), "https://ü:***@hôst/ä");
    }

    #[test]
    fn redaction_is_idempotent_and_keeps_whitespace() {
        let s = "a  --api-key\tx\n--token=y https://u:p@h Bearer z";
        let once = text(s);
        assert_eq!(
            once,
            "a  --api-key\t***\n--token=*** https://u:***@h Bearer ***"
        );
        assert_eq!(text(&once), once);
        assert_eq!(text(""), "");
        assert_eq!(text("   "), "   ");
    }

    #[test]
    fn a_masked_value_leaves_no_prefix_after_truncation() {
        let secret = "sk-".to_string() + &"a".repeat(1000);
        let line = argv(&args(&["server", "--api-key", &secret])).join(" ");
        let cut: String = line.chars().take(20).collect();
        assert!(!cut.contains("sk-") && !line.contains("sk-"), "{line}");
    }
}
