//! What the tracker tells the trace exporter about each finished request.

use crate::labels::WorkloadLabels;

use super::traceparent::TraceParent;

/// One finished request, as the tracker saw it on the wire (owned, no prompt text): the
/// OTLP exporter (`crate::export::otlp::traces`) makes a span of it.
#[derive(Clone, Debug)]
pub struct RequestFinished {
    pub model: String,
    /// `vllm`, `tgi`, ... (from discovery), when known.
    pub server: Option<&'static str>,
    /// The server's listening port, when discovery found it.
    pub port: Option<u16>,
    pub method: String,
    pub route: String,
    pub status: Option<u16>,
    pub error: Option<&'static str>,
    pub pid: u32,
    pub start_ns: u64,
    pub first_token_ns: Option<u64>,
    pub end_ns: u64,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub stream: bool,
    /// `http1`, `h2` or `grpc`.
    pub protocol: &'static str,
    /// gRPC: the call's status code.
    pub grpc_status: Option<u32>,
    pub parent: Option<TraceParent>,
    /// The server's pod (attribution); empty outside Kubernetes.
    pub workload: WorkloadLabels,
}

impl crate::queue::Weigh for RequestFinished {
    fn weight(&self) -> usize {
        let w = &self.workload;
        size_of::<Self>()
            + [
                &self.model,
                &self.method,
                &self.route,
                &w.node,
                &w.namespace,
                &w.pod,
                &w.container,
            ]
            .iter()
            .map(|s| s.capacity())
            .sum::<usize>()
    }
}
