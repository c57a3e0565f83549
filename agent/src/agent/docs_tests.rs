//! docs/metrics.md and docs/configuration.md read against the code, in both directions: a
//! family, label, label value or config key the code gains without its line in the docs fails
//! here, and so does a line in the docs that the code does not back. Here because this module
//! is the one that makes every stage's families.

use std::collections::{BTreeMap, BTreeSet};

use super::StageMetrics;
use crate::{
    config::{Config, Overrides},
    http::conn::Bad,
    ingest::decode::Event,
    scrape::metrics::ServerSeries,
};

const METRICS_DOC: &str = include_str!("../../../docs/metrics.md");
const CONFIG_DOC: &str = include_str!("../../../docs/configuration.md");

const WORKLOAD: [&str; 4] = ["node", "namespace", "pod", "container"];
const GPU: [&str; 3] = ["gpu", "gpu_uuid", "gpu_type"];

/// The text between backticks.
fn ticked(s: &str) -> impl Iterator<Item = &str> {
    s.split('`').skip(1).step_by(2)
}

/// `s` without what is in parentheses: the label column names label values there.
fn outside_parentheses(s: &str) -> String {
    let mut depth = 0usize;
    s.chars()
        .filter(|&c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

/// One row of a metric table of docs/metrics.md.
#[derive(Debug)]
struct Row {
    kind: String,
    /// Labels every series carries.
    labels: BTreeSet<String>,
    /// Labels left out where unknown (the workload's).
    optional: BTreeSet<String>,
    /// False where the table says where the series come from instead of their labels.
    labels_listed: bool,
    meaning: String,
}

/// The rows of the metric tables above "OTLP names", by each name a row gives.
fn doc_rows() -> BTreeMap<String, Row> {
    let catalogue = METRICS_DOC
        .split("\n## OTLP names")
        .next()
        .unwrap_or(METRICS_DOC);
    let mut rows = BTreeMap::new();
    let mut header: Option<Vec<String>> = None;
    for line in catalogue.lines() {
        if !line.starts_with('|') {
            header = None;
            continue;
        }
        let line = line.replace("\\|", "¦");
        let cells: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        let Some(head) = &header else {
            header = Some(cells);
            continue;
        };
        if cells[0].starts_with("---") || !matches!(head[0].as_str(), "metric" | "name") {
            continue;
        }
        assert_eq!(head.get(1).map(String::as_str), Some("type"), "{line}");
        let label_cell = outside_parentheses(&cells[2]);
        let mut labels: BTreeSet<String> = ticked(&label_cell).map(String::from).collect();
        let mut optional = BTreeSet::new();
        if label_cell.contains("workload") {
            optional.extend(WORKLOAD.map(String::from));
        }
        if head[2] == "extra labels" || label_cell.contains("GPU labels") {
            labels.extend(GPU.map(String::from));
        }
        for name in ticked(&cells[0]) {
            let row = Row {
                kind: cells[1].split_whitespace().next().unwrap_or("").to_string(),
                labels: labels.clone(),
                optional: optional.clone(),
                labels_listed: head[2] != "from",
                meaning: cells.last().cloned().unwrap_or_default(),
            };
            assert!(
                rows.insert(name.to_string(), row).is_none(),
                "`{name}` has two rows in docs/metrics.md"
            );
        }
    }
    rows
}

/// A family as the agent has it at start.
#[derive(Debug, Default)]
struct Family {
    /// From `# TYPE`: known for the families encoded at start (those with a series).
    kind: Option<String>,
    /// Label names of the series at start, if any.
    labels: Option<BTreeSet<String>>,
}

/// `name{a="x",b="y"} 1` → (`name`, [(`a`, `x`), (`b`, `y`)]).
fn sample(line: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = line.split_once('{') else {
        return (line.split_whitespace().next().unwrap_or(""), Vec::new());
    };
    let mut pairs = Vec::new();
    let mut chars = rest.chars();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        pairs.push((key.trim_start_matches(',').to_string(), value));
        if chars.clone().next() == Some('}') {
            break;
        }
    }
    (name, pairs)
}

/// Every family the agent registers, with its type and labels where it has series at start;
/// the series the scrape collector derives, which exist only once a server is scraped.
fn code_families(m: &StageMetrics) -> BTreeMap<String, Family> {
    let debug = m.core.read(|r| format!("{r:?}"));
    let mut families: BTreeMap<String, Family> = debug
        .split("Descriptor { name: \"")
        .skip(1)
        .filter_map(|s| s.split_once('"'))
        .map(|(name, _)| (name.to_string(), Family::default()))
        .collect();
    let mut current = None;
    for line in m.core.encode().lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').expect("# TYPE name kind");
            families.entry(name.to_string()).or_default().kind = Some(kind.to_string());
            current = Some(name.to_string());
        } else if !line.starts_with('#') {
            let name = current.as_ref().expect("a sample after its # TYPE");
            let labels = sample(line).1.into_iter().map(|(k, _)| k);
            let family = families.get_mut(name).expect("registered");
            family
                .labels
                .get_or_insert_with(BTreeSet::new)
                .extend(labels.filter(|k| k != "le"));
        }
    }
    for s in ServerSeries::ALL {
        let kind = if s.is_counter() { "counter" } else { "gauge" };
        families.insert(
            s.name().to_string(),
            Family {
                kind: Some(kind.into()),
                labels: None,
            },
        );
    }
    families
}

#[test]
fn every_registered_family_has_its_row_and_every_row_a_family() {
    let m = StageMetrics::new();
    let code = code_families(&m);
    let doc = doc_rows();
    assert!(code.len() > 50 && doc.len() > 50, "{code:?} {doc:?}");
    let mut errors = Vec::new();
    let mut documented = BTreeSet::new();
    for (name, family) in &code {
        // The OpenMetrics encoder writes a counter's samples with `_total`, and so do the docs.
        let total = format!("{name}_total");
        let (doc_name, row) = match (doc.get(&total), doc.get(name)) {
            (Some(row), _) if row.kind == "counter" => (total, row),
            (_, Some(row)) if row.kind != "counter" => (name.clone(), row),
            _ => {
                errors.push(match family.kind.as_deref() {
                    Some("counter") => format!("`{name}_total` (counter) has no row"),
                    Some(kind) => format!("`{name}` ({kind}) has no row"),
                    // Not encoded at start: the name tells no more.
                    None => format!("`{name}` has no row (nor `{name}_total` as a counter)"),
                });
                continue;
            }
        };
        documented.insert(doc_name.clone());
        if let Some(kind) = &family.kind {
            if *kind != row.kind {
                errors.push(format!(
                    "`{doc_name}` is a {kind}, its row says {}",
                    row.kind
                ));
            }
        }
        if let (Some(seen), true) = (&family.labels, row.labels_listed) {
            for label in seen {
                if !row.labels.contains(label) && !row.optional.contains(label) {
                    errors.push(format!(
                        "`{doc_name}` has label `{label}`, its row does not"
                    ));
                }
            }
            for label in row.labels.difference(seen) {
                errors.push(format!(
                    "`{doc_name}`'s row names label `{label}`, its series lack it"
                ));
            }
        }
    }
    for name in doc.keys().filter(|n| !documented.contains(*n)) {
        errors.push(format!("`{name}` has a row but no family is registered"));
    }
    assert!(
        errors.is_empty(),
        "docs/metrics.md disagrees with the families the agent registers:\n{}",
        errors.join("\n")
    );
}

/// The label values a row's meaning names between backticks.
fn doc_values(metric: &str) -> BTreeSet<String> {
    let rows = doc_rows();
    let row = rows
        .get(metric)
        .unwrap_or_else(|| panic!("`{metric}` has no row in docs/metrics.md"));
    ticked(&row.meaning)
        .filter(|v| {
            v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(String::from)
        .collect()
}

fn assert_same_values(metric: &str, code: BTreeSet<String>) {
    let doc = doc_values(metric);
    assert_eq!(
        doc, code,
        "`{metric}`: the values docs/metrics.md lists (left) are not those the code emits (right)"
    );
}

/// The values of `label` on `metric`'s series in `text`.
fn values_in(text: &str, metric: &str, label: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(sample)
        .filter(|(name, _)| *name == metric)
        .flat_map(|(_, pairs)| pairs)
        .filter(|(k, _)| k == label)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn event_sources_are_the_documented_ones() {
    let every = [
        Event::CudaMem(Default::default()),
        Event::ProcessExit(Default::default()),
        Event::OomKill(Default::default()),
    ];
    for e in &every {
        // No `_` arm: a new kind of event stops this from compiling until it is listed above.
        match e {
            Event::CudaMem(_) | Event::ProcessExit(_) | Event::OomKill(_) => {}
        }
    }
    let mut sources: BTreeSet<String> = every.iter().map(|e| e.source().into()).collect();
    // The http tracker counts its records under a source of its own from the start.
    let m = StageMetrics::new();
    let _tracker = crate::http::tracker::HttpTracker::new(m.http.clone(), Default::default());
    sources.extend(values_in(
        &m.core.encode(),
        "inferscope_events_total",
        "source",
    ));
    assert_same_values("inferscope_events_total", sources);
}

#[test]
fn lost_event_sources_are_the_documented_ones() {
    let sources = crate::probe::manager::LOST_SOURCES
        .iter()
        .map(|(_, s)| s.to_string())
        .collect();
    assert_same_values("inferscope_events_lost_total", sources);
}

#[test]
fn bad_input_kinds_are_the_documented_ones() {
    let every = [
        Bad::NotHttp,
        Bad::HeaderTruncated,
        Bad::BadFraming,
        Bad::UnmatchedResponse,
        Bad::EventTooLarge,
        Bad::PipelineOverflow,
        Bad::BadTraceparent,
        Bad::H2FramingLost,
        Bad::HpackUnknownReference,
        Bad::HpackMalformed,
        Bad::TooManyStreams,
        Bad::TlsUnsupported,
    ];
    for b in every {
        // No `_` arm: a new kind stops this from compiling until it is listed above.
        match b {
            Bad::NotHttp
            | Bad::HeaderTruncated
            | Bad::BadFraming
            | Bad::UnmatchedResponse
            | Bad::EventTooLarge
            | Bad::PipelineOverflow
            | Bad::BadTraceparent
            | Bad::H2FramingLost
            | Bad::HpackUnknownReference
            | Bad::HpackMalformed
            | Bad::TooManyStreams
            | Bad::TlsUnsupported => {}
        }
    }
    let mut kinds: BTreeSet<String> = every.iter().map(|b| b.label().into()).collect();
    // Not a parser's verdict: the tracker counts a connection it has no room for.
    kinds.insert("connection_limit".into());
    assert_same_values("inferscope_http_bad_input_total", kinds);
}

/// The TOML block of docs/configuration.md, with the tables a header's `# also [a], [b]`
/// stands for written out.
fn doc_config() -> toml::Table {
    let block = CONFIG_DOC
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a ```toml block in docs/configuration.md");
    let mut table: toml::Table = block.parse().expect("docs/configuration.md's TOML parses");
    for line in block.lines().filter(|l| l.starts_with('[')) {
        let Some((head, comment)) = line.split_once('#') else {
            continue;
        };
        let Some(also) = comment.trim().strip_prefix("also ") else {
            continue;
        };
        let path: Vec<&str> = head.trim().trim_matches(['[', ']']).split('.').collect();
        let section = lookup(&table, &path).expect("the header's table").clone();
        for other in also.split(',') {
            let other: Vec<&str> = other.trim().trim_matches(['[', ']']).split('.').collect();
            let (last, parent) = other.split_last().expect("a table name");
            let parent = parent.iter().fold(&mut table, |t, k| {
                t.get_mut(*k)
                    .and_then(toml::Value::as_table_mut)
                    .expect("a parent table")
            });
            parent.insert(last.to_string(), section.clone());
        }
    }
    table
}

fn lookup<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, parent) = path.split_last()?;
    let mut t = table;
    for k in parent {
        t = t.get(*k)?.as_table()?;
    }
    t.get(*last)
}

const PROBE: &str = "__docs_probe";

/// The keys of the section at `path` as `Config`'s deserializer knows them: serde names
/// every field of a `deny_unknown_fields` struct when it refuses an unknown one. None where
/// `path` is not such a struct (a value, a list, a map with keys of the user's).
fn code_keys(path: &[&str]) -> Option<Vec<String>> {
    let mut value = toml::Value::Table(toml::Table::from_iter([(
        PROBE.to_string(),
        toml::Value::Integer(0),
    )]));
    for k in path.iter().rev() {
        value = toml::Value::Table(toml::Table::from_iter([(k.to_string(), value)]));
    }
    let err = value.try_into::<Config>().err()?.to_string();
    let refused = format!("unknown field `{PROBE}`");
    let (_, expected) = err.split_once(&refused)?;
    // The message goes on with "in `section`" on a line of its own.
    let expected = expected.lines().next().unwrap_or("");
    Some(ticked(expected).map(String::from).collect())
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let doc = doc_config();
    // Documented keys are keys: the agent's own loader refuses any other.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    if let Err(e) = Config::load(Some(&path), &crate::env::env(&[]), &Overrides::default()) {
        panic!(
            "docs/configuration.md's TOML block is refused: {}",
            crate::error_chain(&e)
        );
    }
    // And every key of every section is documented.
    let mut missing = Vec::new();
    let mut sections = vec![Vec::<String>::new()];
    while let Some(section) = sections.pop() {
        let path: Vec<&str> = section.iter().map(String::as_str).collect();
        let keys = code_keys(&path).expect("a section");
        for key in keys {
            let mut p = path.clone();
            p.push(&key);
            if lookup(&doc, &p).is_none() {
                missing.push(p.join("."));
            }
            if code_keys(&p).is_some() {
                sections.push(p.iter().map(|s| s.to_string()).collect());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys the agent reads that docs/configuration.md's TOML block lacks: {missing:?}"
    );
}

/// Where the agent looks for NVML and CUDA drivers is what the page says, in order.
#[test]
fn the_driver_directories_are_the_documented_ones() {
    let paragraph = CONFIG_DOC
        .split("\n\n")
        .find(|p| p.starts_with("Driver directories"))
        .expect("a paragraph of docs/configuration.md starting `Driver directories`");
    let doc: Vec<&str> = ticked(paragraph).filter(|t| t.starts_with('/')).collect();
    assert_eq!(
        doc,
        crate::probe::discover::STANDARD_DIRS,
        "docs/configuration.md (left) against the agent's search (right)"
    );
}
