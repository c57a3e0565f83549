//! A parser of the Prometheus text exposition format 0.0.4 (`# HELP`, `# TYPE`, sample lines
//! with optional labels and timestamp), as the inference servers' `prometheus_client` and
//! `metrics-exporter-prometheus` write it; it also reads the agent's own OpenMetrics output
//! (counter samples named `<family>_total`, `# EOF` as a comment) for the tests.
//!
//! Hand-written because no crate fits: `openmetrics-parser` is LGPL and quadratic in a
//! family's size, `prometheus-parse` drops names with colons (`vllm:*`),
//! `prom_text_format_parser` leaves label values escaped and cannot join a family split in
//! two blocks, `prometheus-exposition-format-rs` does not group histograms and asserts on
//! input. One pass over the lines, a hash lookup per sample: linear in the body's size.
//! Bad input is an error with its line number, never a panic.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}")]
pub struct TextError {
    /// 1-based.
    pub line: usize,
    pub what: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Type {
    /// Sample-name suffixes a family of this type owns besides its own name.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            // `_total`: the OpenMetrics spelling of a counter's sample.
            Type::Counter => &["_total", "_created"],
            Type::Histogram => &["_bucket", "_sum", "_count", "_created"],
            Type::Summary => &["_sum", "_count", "_created"],
            Type::Gauge | Type::Untyped => &[],
        }
    }
}

/// (name, value) pairs in the order written, values unescaped.
pub type Labels = Vec<(String, String)>;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_bucket`, `x_sum`, ...).
    pub name: String,
    pub labels: Labels,
    pub value: f64,
    /// Milliseconds since the epoch.
    pub timestamp: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetricFamily {
    /// As the `# TYPE`/`# HELP` line named it, else the first sample's name.
    pub name: String,
    pub kind: Type,
    /// Unescaped.
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

struct Builder {
    families: Vec<MetricFamily>,
    by_name: HashMap<String, usize>,
    /// Whether a family's type came from a `# TYPE` line.
    typed: Vec<bool>,
    /// The family of the last line: a sample of its name or with a suffix of its type joins
    /// it first (`h_sum` of histogram `h` even where a gauge `h_sum` came before).
    current: Option<usize>,
}

impl Builder {
    fn family(&mut self, name: &str) -> usize {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        self.families.push(MetricFamily {
            name: name.to_string(),
            kind: Type::Untyped,
            help: None,
            samples: Vec::new(),
        });
        self.typed.push(false);
        self.by_name
            .insert(name.to_string(), self.families.len() - 1);
        self.families.len() - 1
    }

    /// The family a sample belongs to: its own name's, or a typed family whose name is the
    /// sample's less a suffix of that type. Lines of one family need not be adjacent (the
    /// format asks it, some servers write a family in two blocks).
    fn family_of(&mut self, sample: &str) -> usize {
        if let Some(i) = self.current {
            if self.owns(i, sample) {
                return i;
            }
        }
        if let Some(&i) = self.by_name.get(sample) {
            return i;
        }
        for suffix in ["_bucket", "_sum", "_count", "_total", "_created"] {
            let Some(base) = sample.strip_suffix(suffix) else {
                continue;
            };
            if let Some(&i) = self.by_name.get(base) {
                if self.families[i].kind.suffixes().contains(&suffix) {
                    return i;
                }
            }
        }
        self.family(sample)
    }

    fn owns(&self, i: usize, sample: &str) -> bool {
        let f = &self.families[i];
        match sample.strip_prefix(f.name.as_str()) {
            Some("") => true,
            Some(suffix) => f.kind.suffixes().contains(&suffix),
            None => false,
        }
    }
}

/// The families of a body, in the order first named, each sample in its family.
pub fn parse(text: &str) -> Result<Vec<MetricFamily>, TextError> {
    let mut b = Builder {
        families: Vec::new(),
        by_name: HashMap::new(),
        typed: Vec::new(),
        current: None,
    };
    for (n, line) in text.split('\n').enumerate() {
        let err = |what| TextError { line: n + 1, what };
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.trim_start_matches([' ', '\t']);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            comment_line(&mut b, comment).map_err(err)?;
            continue;
        }
        let sample = sample_line(line).map_err(err)?;
        let i = b.family_of(&sample.name);
        b.families[i].samples.push(sample);
        b.current = Some(i);
    }
    Ok(b.families)
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// `# HELP name text`, `# TYPE name type`; any other comment is ignored.
fn comment_line(b: &mut Builder, comment: &str) -> Result<(), &'static str> {
    let comment = comment.trim_start_matches(is_blank);
    let (keyword, rest) = comment.split_once(is_blank).unwrap_or((comment, ""));
    if keyword != "HELP" && keyword != "TYPE" {
        return Ok(());
    }
    let rest = rest.trim_start_matches(is_blank);
    let (name, rest) = metric_name(rest).ok_or("no metric name after HELP/TYPE")?;
    if !rest.is_empty() && !rest.starts_with(is_blank) {
        return Err("bad metric name after HELP/TYPE");
    }
    let rest = rest.trim_start_matches(is_blank);
    let i = b.family(name);
    b.current = Some(i);
    if keyword == "HELP" {
        let help = unescape_help(rest);
        b.families[i].help.get_or_insert(help);
        return Ok(());
    }
    let kind = match rest.trim_end_matches(is_blank) {
        "counter" => Type::Counter,
        "gauge" => Type::Gauge,
        "histogram" => Type::Histogram,
        "summary" => Type::Summary,
        "untyped" | "unknown" => Type::Untyped,
        _ => return Err("unknown TYPE"),
    };
    if b.typed[i] && b.families[i].kind != kind {
        return Err("a second TYPE of another type for one name");
    }
    b.typed[i] = true;
    b.families[i].kind = kind;
    Ok(())
}

/// HELP text escapes only `\\` and `\n`; any other backslash stands for itself.
fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` at the start of `s`, and the rest.
fn metric_name(s: &str) -> Option<(&str, &str)> {
    name(s, true)
}

/// `[a-zA-Z_][a-zA-Z0-9_]*` at the start of `s`, and the rest.
fn label_name(s: &str) -> Option<(&str, &str)> {
    name(s, false)
}

fn name(s: &str, colons: bool) -> Option<(&str, &str)> {
    let ok = |b: u8, first: bool| {
        b.is_ascii_alphabetic()
            || b == b'_'
            || (colons && b == b':')
            || (!first && b.is_ascii_digit())
    };
    let bytes = s.as_bytes();
    if !bytes.first().is_some_and(|b| ok(*b, true)) {
        return None;
    }
    let end = bytes
        .iter()
        .position(|b| !ok(*b, false))
        .unwrap_or(bytes.len());
    // ASCII bytes only: `end` is a char boundary.
    Some(s.split_at(end))
}

/// `name[{labels}] value [timestamp]`.
fn sample_line(line: &str) -> Result<Sample, &'static str> {
    let (name, rest) = metric_name(line).ok_or("not a metric name")?;
    let rest = rest.trim_start_matches(is_blank);
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => labels(inner)?,
        None => (Vec::new(), rest),
    };
    let mut fields = rest.split(is_blank).filter(|f| !f.is_empty());
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or("bad value")?;
    let timestamp = match fields.next() {
        Some(t) => Some(t.parse::<i64>().map_err(|_| "bad timestamp")?),
        None => None,
    };
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        timestamp,
    })
}

/// A float as Go's `ParseFloat` writes it: decimal, `NaN`, `+Inf`, `-Inf` (any case).
fn parse_value(s: &str) -> Option<f64> {
    // Rust's parser also takes `infinity` and `nan` in any case, as Go's does; it refuses
    // hexadecimal and `_`, which no exporter writes.
    s.parse::<f64>().ok()
}

/// The labels after `{` up to and including `}`, and the rest of the line.
fn labels(mut s: &str) -> Result<(Labels, &str), &'static str> {
    let mut out = Labels::new();
    loop {
        s = s.trim_start_matches(is_blank);
        if let Some(rest) = s.strip_prefix('}') {
            // Sorted, not a scan per label: a line may hold many.
            let mut names: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err("a label name twice in one sample");
            }
            return Ok((out, rest));
        }
        let (key, rest) = label_name(s).ok_or("bad label name")?;
        let rest = rest.trim_start_matches(is_blank);
        let rest = rest.strip_prefix('=').ok_or("no `=` after a label name")?;
        let rest = rest.trim_start_matches(is_blank);
        let rest = rest.strip_prefix('"').ok_or("label value not quoted")?;
        let (value, rest) = label_value(rest)?;
        out.push((key.to_string(), value));
        s = rest.trim_start_matches(is_blank);
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("no `,` or `}` after a label");
        }
    }
}

/// A label value after its opening quote (escapes `\\`, `\"`, `\n`), and the rest after the
/// closing quote.
fn label_value(s: &str) -> Result<(String, &str), &'static str> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                _ => return Err("bad escape in a label value"),
            },
            c => out.push(c),
        }
    }
    Err("unterminated label value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_with_colons_labels_escapes_and_timestamps() {
        let fs = parse(
            "# HELP vllm:num_requests_running Running \\\\ now\\nreally \\x.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{model_name=\"a\\\\b\\\"c\\nd\", engine = \"0\" ,} 3 1395066363000\r\n\
             \tvllm:num_requests_running {} -7e-3 -12\n\
             no_labels 1\n",
        )
        .unwrap();
        assert_eq!(fs.len(), 2);
        let f = &fs[0];
        assert_eq!(f.name, "vllm:num_requests_running");
        assert_eq!(f.kind, Type::Gauge);
        assert_eq!(f.help.as_deref(), Some("Running \\ now\nreally \\x."));
        assert_eq!(
            f.samples[0],
            Sample {
                name: "vllm:num_requests_running".into(),
                labels: labels(&[("model_name", "a\\b\"c\nd"), ("engine", "0")]),
                value: 3.0,
                timestamp: Some(1395066363000),
            }
        );
        assert_eq!(f.samples[1].labels, vec![]);
        assert_eq!(f.samples[1].value, -0.007);
        assert_eq!(f.samples[1].timestamp, Some(-12));
        assert_eq!(fs[1].name, "no_labels");
        assert_eq!(fs[1].kind, Type::Untyped);
        assert_eq!(fs[1].help, None);
    }

    #[test]
    fn nan_and_infinities() {
        let fs = parse("a NaN\na +Inf\na -Inf\na Inf\na 1e400\na nan\n").unwrap();
        let v: Vec<f64> = fs[0].samples.iter().map(|s| s.value).collect();
        assert!(v[0].is_nan() && v[5].is_nan());
        assert_eq!(
            &v[1..5],
            [
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::INFINITY
            ]
        );
    }

    #[test]
    fn histogram_lines_join_their_family_even_when_split() {
        let fs = parse(
            "# TYPE h histogram\n\
             h_bucket{le=\"1\"} 1\n\
             # TYPE g gauge\n\
             g 2\n\
             h_bucket{le=\"+Inf\"} 3\n\
             # HELP h Latency.\n\
             # TYPE h histogram\n\
             h_sum 4.5\n\
             h_count 3\n\
             h_created 17\n\
             g_sum 1\n",
        )
        .unwrap();
        let names: Vec<&str> = fs.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["h", "g", "g_sum"]);
        let h = &fs[0];
        assert_eq!(h.help.as_deref(), Some("Latency."));
        let samples: Vec<&str> = h.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            samples,
            ["h_bucket", "h_bucket", "h_sum", "h_count", "h_created"]
        );
        assert_eq!(h.samples[1].labels, labels(&[("le", "+Inf")]));
        // Lines next to their TYPE line belong to it before a family of their own name.
        let fs =
            parse("# TYPE h_sum gauge\nh_sum 1\n# TYPE h histogram\nh_sum 2\nh_count 1\n").unwrap();
        assert_eq!((fs[0].samples.len(), fs[1].samples.len()), (1, 2));
    }

    #[test]
    fn counters_in_both_spellings() {
        let fs = parse("# TYPE a_total counter\na_total 1\n# TYPE b counter\nb_total 2\n# EOF\n")
            .unwrap();
        assert_eq!(fs[0].samples[0].name, "a_total");
        assert_eq!(fs[1].name, "b");
        assert_eq!(fs[1].samples[0].name, "b_total");
        assert_eq!(fs.len(), 2);
    }

    #[test]
    fn garbage_is_an_error_with_its_line() {
        for (body, line) in [
            ("<html>oops</html>", 1),
            ("a 1\nx{a=\"b} 1\n", 2),
            ("\u{0}\u{1}", 1),
            ("x abc", 1),
            ("x", 1),
            ("x 1 2 3", 1),
            ("x 1 1.5", 1),
            ("x{a=\"\\t\"} 1", 1),
            ("x{a=b} 1", 1),
            ("x{a=\"1\" b=\"2\"} 1", 1),
            ("x{a=\"1\",a=\"2\"} 1", 1),
            ("x{1a=\"1\"} 1", 1),
            ("x{a=\"1\"", 1),
            ("x{a=\"é\\", 1),
            ("# TYPE x countr", 1),
            ("# TYPE x counter\n# TYPE x gauge", 2),
            ("# TYPE", 1),
            ("# HELP 9x y", 1),
            ("# TYPE x-y gauge", 1),
        ] {
            let e = parse(body).expect_err(body);
            assert_eq!(e.line, line, "{body:?}: {e}");
        }
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("\n# just a comment\n#\n  \n").unwrap(), vec![]);
    }

    #[test]
    fn a_large_family_parses_in_one_pass() {
        let mut body = String::from("# TYPE p gauge\n");
        for i in 0..200_000 {
            body.push_str(&format!("p{{i=\"{i}\"}} {i}\n"));
        }
        let fs = parse(&body).unwrap();
        assert_eq!(fs[0].samples.len(), 200_000);
        assert_eq!(fs[0].samples[199_999].value, 199_999.0);
    }
}
