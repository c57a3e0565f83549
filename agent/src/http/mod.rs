//! Family `http`: inference requests timed on the wire. The probes capture the socket
//! syscalls of watched processes ([`watch`] decides which, from what [`crate::servers`] finds,
//! and seeds connections that predate the agent); the reader (`crate::ingest`) decodes the
//! family's records ([`Record`]) and routes them to the [`tracker`] stage, which keeps one
//! [`wire::Wire`] per connection (HTTP/1.x in [`conn`], HTTP/2 and gRPC in [`h2`]) and turns
//! finished exchanges into the `llm_*` metrics
//! ([`metrics`]); a model worker's calls from its front end go to [`engine`] instead.

pub mod body;
pub mod conn;
pub mod engine;
pub mod event_skim;
pub mod finished;
pub mod gap;
pub mod gpu_cost;
pub mod h2;
pub mod load;
pub mod metrics;
pub mod models;
pub mod payload;
pub mod requests;
pub mod traceparent;
pub mod tracker;
pub mod watch;
pub mod wire;

pub use crate::ingest::HttpRecord as Record;

pub type Batch = Vec<Record>;

/// The `[http]` section of the config file.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Ports whose listening processes are watched as inference servers (as `--watch-port`).
    pub watch_ports: Vec<u16>,
    /// Substrings of command lines whose processes are watched as inference servers too (for
    /// servers discovery does not know by name).
    pub match_commands: Vec<String>,
    /// Payload bytes captured per syscall buffer (at most 4096): enough for a header block
    /// and an SSE event.
    pub capture_bytes: u32,
    /// Connections with parser state; further ones are counted and ignored.
    pub max_connections: usize,
    /// A connection without traffic for this long is dropped; its open requests end as
    /// `timeout`.
    pub idle_timeout_secs: u64,
    /// Model names that are `model` label values at once (a name becomes one when a server
    /// answers a request naming it with success, or a server's command line names it; any
    /// other name is `other`). Past the limit further names are `other` too.
    pub max_models: usize,
    /// A model name no request has named for this long stops being a label value (its
    /// series are removed) until a server answers it with success again; 0: never.
    pub model_expiry_secs: u64,
    /// Bytes of parser state (header and body buffers, SSE events, the exchanges it keeps)
    /// one connection may hold; past it the connection's open exchanges end as `untracked`
    /// and its buffers are freed (`inferscope_dropped_total{what="http_exchange",
    /// reason="too_large"}`).
    pub max_connection_bytes: usize,
    /// Bytes of parser state all watched connections together may hold. Past it a
    /// connection that grows is shed as above (`reason="budget"`) and new connections are
    /// not tracked (`what="http_connection",reason="budget"`): the state never grows past it.
    pub state_budget_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        let limits = tracker::Limits::default();
        Self {
            watch_ports: Vec::new(),
            match_commands: Vec::new(),
            capture_bytes: agent_common::http::CAPTURE_DEFAULT,
            max_connections: limits.max_connections,
            idle_timeout_secs: limits.idle_timeout.as_secs(),
            max_models: limits.max_models,
            model_expiry_secs: limits.model_expiry.as_secs(),
            max_connection_bytes: limits.max_connection_bytes,
            state_budget_bytes: limits.state_budget_bytes,
        }
    }
}

impl HttpConfig {
    pub fn limits(&self) -> tracker::Limits {
        tracker::Limits {
            max_connections: self.max_connections,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs),
            max_models: self.max_models,
            model_expiry: std::time::Duration::from_secs(self.model_expiry_secs),
            max_connection_bytes: self.max_connection_bytes,
            state_budget_bytes: self.state_budget_bytes,
        }
    }
}

/// Bytes of records queued for the tracker (batches of at most
/// [`crate::ingest::MAX_HTTP_BATCH_BYTES`]); past it the reader waits and the ring buffer
/// absorbs bursts (what it cannot hold is counted in `inferscope_events_lost_total`). It held
/// 256 batches of up to 16 MiB each, then 2.
pub const QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// The running family: the tracker task and the watcher thread.
pub struct Stage {
    tx: Option<crate::queue::Sender<tracker::Input>>,
    task: Option<tokio::task::JoinHandle<tracker::HttpTracker>>,
    watcher: Option<(
        std::sync::mpsc::Sender<crate::probe::http::Control>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Stage {
    /// Starts the tracker and, when the probes are attached (`maps`), the watcher thread,
    /// each with its heartbeat in `health`. Without the probes it is inert.
    #[expect(
        clippy::too_many_arguments,
        reason = "the stage's inputs, named at the one call"
    )]
    pub fn start(
        maps: Option<crate::probe::http::HttpMaps>,
        by_events: bool,
        config: &HttpConfig,
        procfs: crate::proc::ProcFs,
        discovery_interval: std::time::Duration,
        metrics: std::sync::Arc<metrics::HttpMetrics>,
        load: std::sync::Arc<load::LoadBoard>,
        servers: std::sync::Arc<crate::servers::ServerBoard>,
        attrib: Option<std::sync::Arc<crate::attrib::Attributor>>,
        spans: Option<crate::queue::Sender<finished::RequestFinished>>,
        requests: std::sync::Arc<requests::RequestLog>,
        health: &crate::health::Health,
    ) -> std::io::Result<Stage> {
        let Some(maps) = maps else {
            return Ok(Stage {
                tx: None,
                task: None,
                watcher: None,
            });
        };
        let dropped = metrics
            .core
            .dropped
            .get_or_create(&crate::metrics::DroppedLabels {
                what: "http_queue",
                reason: "queue_full",
            })
            .clone();
        let (tx, rx) = crate::queue::channel(QUEUE_BYTES, dropped);
        let t = tracker::HttpTracker::new(metrics.clone(), config.limits())
            .with_procfs(procfs.clone())
            .with_requests(requests)
            .with_load(load)
            .with_spans(spans)
            .with_attribution(attrib.clone());
        let beat = health.heartbeat("http-tracker", crate::health::QUICK);
        let task = tokio::spawn(tracker::run(t, rx, beat));
        let watcher = watch::Watcher::new(
            maps,
            procfs,
            config.watch_ports.clone(),
            config.match_commands.clone(),
            tx.clone(),
        )
        .with_board(servers)
        .with_attribution(attrib)
        .by_events(by_events)
        .counting_reads(metrics.core.clone());
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let interval = discovery_interval;
        let beat = health.heartbeat(
            "http-watcher",
            crate::health::deadline(interval, crate::health::SLOW),
        );
        let handle = std::thread::Builder::new()
            .name("http-watcher".into())
            .spawn(move || watcher.run(interval, stop_rx, beat))?;
        Ok(Stage {
            tx: Some(tx),
            task: Some(task),
            watcher: Some((stop_tx, handle)),
        })
    }

    /// Whether the watcher runs (and so publishes the server list).
    pub fn watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// The watcher's control channel: the probe budget tells it when the probes go off and
    /// come back.
    pub fn control(&self) -> Option<std::sync::mpsc::Sender<crate::probe::http::Control>> {
        self.watcher.as_ref().map(|(control, _)| control.clone())
    }

    /// Where the reader sends the family's records.
    pub fn sender(&self) -> Option<crate::queue::Sender<tracker::Input>> {
        self.tx.clone()
    }

    /// After the reader has stopped: stops the watcher, lets the tracker drain, each within
    /// `share` and the shutdown's deadline.
    pub async fn stop(
        mut self,
        deadline: &mut crate::deadline::Deadline,
        share: std::time::Duration,
    ) {
        if let Some((stop, handle)) = self.watcher.take() {
            let _ = stop.send(crate::probe::http::Control::Stop);
            if let Some(Err(_)) = deadline.join("http-watcher", share, handle).await {
                tracing::error!("http watcher panicked");
            }
        }
        drop(self.tx.take());
        if let Some(task) = self.task.take() {
            match deadline.task("http-tracker", share, task).await {
                Some(Ok(t)) => {
                    tracing::debug!(connections = t.connections(), "http tracker drained")
                }
                Some(Err(e)) => tracing::error!(error = %e, "http tracker panicked"),
                None => {}
            }
        }
    }
}
