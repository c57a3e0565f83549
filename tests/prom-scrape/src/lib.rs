//! Scraping a Prometheus endpoint without a client stack: one blocking HTTP/1.1 GET and a
//! parser for the text exposition format (OpenMetrics included). Used by the root-tier tests
//! and by `cargo xtask demo`, which must build before anything else is installed.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// GET over plain HTTP/1.1: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, dechunk(&body)))
}

fn dechunk(body: &str) -> String {
    // axum answers chunked when the length is unknown; undo it if so.
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// A series' labels and value.
pub type Sample = (Vec<(String, String)>, f64);

/// One scrape of `/metrics`: series → value.
#[derive(Debug, Default)]
pub struct Scrape {
    pub series: HashMap<String, Vec<Sample>>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut series: HashMap<String, Vec<_>> = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (head, value) = line.rsplit_once(' ').expect("series line");
            let value: f64 = value.parse().expect("value");
            let (name, labels) = match head.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
                None => (head, Vec::new()),
            };
            series
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Self {
            series,
            text: text.to_string(),
        }
    }

    /// Sum of the series of `name` whose labels include all of `want` (0 when none).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.series
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(labels, _)| {
                want.iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            // Not `.sum()`: an empty float sum is -0.0.
            .fold(0.0, |acc, (_, v)| acc + v)
    }

    /// Distinct values of `label` among the series of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .series
            .get(name)
            .into_iter()
            .flatten()
            .flat_map(|(labels, _)| {
                labels
                    .iter()
                    .filter(|(k, _)| k == label)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.series
            .get(name)
            .into_iter()
            .flatten()
            .any(|(labels, _)| {
                want.iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'));
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next().unwrap_or('\\')),
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_series_labels_and_escapes() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE a counter\na_total{api=\"cuMemAlloc_v2\",error=\"out_of_memory\"} 3\n\
             a_total{api=\"cuMemFree_v2\",error=\"say \\\"hi\\\"\"} 2\nb 1.5\n# EOF\n",
        );
        assert_eq!(s.sum("a_total", &[]), 5.0);
        assert_eq!(s.sum("a_total", &[("api", "cuMemAlloc_v2")]), 3.0);
        assert!(s.has("a_total", &[("error", "say \"hi\"")]));
        assert_eq!(s.sum("b", &[]), 1.5);
        assert!(!s.has("c", &[]));
    }

    #[test]
    fn undoes_chunked_encoding() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert_eq!(dechunk("plain body"), "plain body");
    }
}
