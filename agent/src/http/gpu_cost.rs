//! GPU energy and busy time per model. Each GPU's energy and busy time over one NVML sampling
//! interval ([`GpuUsage`]) are split between the processes on it, then each process's part
//! goes to the inference server it belongs to and, within that server, to its models by the
//! output tokens each produced in the interval. How (docs/metrics.md, "GPU cost per model"):
//!
//! - **Between processes**: by NVML's per-process SM utilization averaged over the interval
//!   where the GPU gives it; else by the GPU memory each holds; else equally; all of it to a
//!   process alone on the GPU.
//! - **To a server**: a process belongs to the outermost watched server among itself and its
//!   ancestors, so that an engine process a server spawned (vLLM's engine core, TGI's shards
//!   under its launcher) is paid for by the server that answers the requests. A process under
//!   no watched server is counted as unattributed.
//! - **Between models**: by the output token events each model's requests produced in the
//!   interval (requests still streaming included), on every server of that group. An interval
//!   without any (a long prefill, an idle server holding the GPU) is split by the tokens the
//!   group has produced since the agent started, else given to the model its command line
//!   names, else to `unknown`.

use std::collections::HashMap;

use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
};

use crate::{gpu::GpuUsage, labels::WorkloadLabels, metrics::CounterF, servers::Server};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub model: String,
    pub gpu: u32,
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuOnlyLabels {
    pub gpu: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SplitLabels {
    pub gpu: u32,
    pub method: &'static str,
}

/// The series this stage adds (registered with the `http` family's).
#[derive(Default)]
pub struct CostMetrics {
    pub energy: Family<CostLabels, CounterF>,
    pub seconds: Family<CostLabels, CounterF>,
    pub unattributed_energy: Family<GpuOnlyLabels, CounterF>,
    pub unattributed_seconds: Family<GpuOnlyLabels, CounterF>,
    pub splits: Family<SplitLabels, Counter>,
}

/// How an interval was split between the processes on a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// One process: all of it.
    Alone,
    /// NVML's per-process SM utilization.
    Utilization,
    /// The GPU memory each process holds (no utilization samples).
    Memory,
    /// Neither known: equal parts.
    Equal,
    /// No process on the GPU: nothing to attribute.
    Nobody,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Alone => "alone",
            Method::Utilization => "process_utilization",
            Method::Memory => "memory",
            Method::Equal => "equal",
            Method::Nobody => "no_process",
        }
    }
}

/// Each process's share of a GPU's interval, summing to 1 (empty when none is on it).
pub fn process_shares(usage: &GpuUsage) -> (Vec<(u32, f64)>, Method) {
    let procs = &usage.processes;
    match procs.len() {
        0 => return (Vec::new(), Method::Nobody),
        1 => return (vec![(procs[0].pid, 1.0)], Method::Alone),
        _ => {}
    }
    let by = |weight: &dyn Fn(&crate::gpu::GpuProcess) -> f64| -> Option<Vec<(u32, f64)>> {
        let total: f64 = procs.iter().map(weight).sum();
        (total > 0.0).then(|| procs.iter().map(|p| (p.pid, weight(p) / total)).collect())
    };
    if let Some(s) = by(&|p| f64::from(p.sm_util.unwrap_or(0))) {
        return (s, Method::Utilization);
    }
    if let Some(s) = by(&|p| p.used_bytes.unwrap_or(0) as f64) {
        return (s, Method::Memory);
    }
    let n = procs.len() as f64;
    (
        procs.iter().map(|p| (p.pid, 1.0 / n)).collect(),
        Method::Equal,
    )
}

/// What the attribution needs from the rest of the tracker at one interval.
pub struct View<'a> {
    /// Output token events so far per (server tgid, model label), requests in flight
    /// included.
    pub tokens: &'a HashMap<(u32, String), u64>,
    pub servers: &'a HashMap<u32, Server>,
    /// The label a server's command-line model has now (`None`: none named).
    pub cmdline_label: &'a dyn Fn(u32) -> Option<String>,
    /// The parent of a process (`None` at the top or when it is gone).
    pub parent: &'a dyn Fn(u32) -> Option<u32>,
    pub workload: &'a dyn Fn(u32) -> WorkloadLabels,
}

impl View<'_> {
    /// The outermost watched server among `pid` and its ancestors.
    pub fn group(&self, pid: u32) -> Option<u32> {
        crate::servers::outermost(pid, &|p| self.servers.contains_key(&p), self.parent)
    }
}

/// The attribution's memory: what each GPU's last interval saw of each group's tokens.
#[derive(Default)]
pub struct GpuCost {
    /// Token events per (gpu, group, model label) at that GPU's last interval.
    seen: HashMap<(u32, u32, String), u64>,
    /// The series made for each model label, removed with it.
    series: HashMap<String, std::collections::HashSet<CostLabels>>,
}

/// The server groups of one sampling round, each process's looked up once.
struct Groups<'a, 'v> {
    view: &'a View<'v>,
    of: HashMap<u32, Option<u32>>,
}

impl Groups<'_, '_> {
    fn of(&mut self, pid: u32) -> Option<u32> {
        let view = self.view;
        *self.of.entry(pid).or_insert_with(|| view.group(pid))
    }
}

impl GpuCost {
    /// Splits each GPU's interval of one sampling round and counts them on `m`.
    pub fn attribute(&mut self, usage: &[GpuUsage], view: &View<'_>, m: &CostMetrics) {
        let mut groups = Groups {
            view,
            of: HashMap::new(),
        };
        // The groups' tokens: every server's, under its group.
        let mut group_tokens: HashMap<u32, HashMap<&str, u64>> = HashMap::new();
        for ((tgid, label), n) in view.tokens {
            if let Some(g) = groups.of(*tgid) {
                *group_tokens.entry(g).or_default().entry(label).or_default() += n;
            }
        }
        for u in usage {
            self.attribute_gpu(u, &group_tokens, &mut groups, m);
        }
    }

    fn attribute_gpu(
        &mut self,
        usage: &GpuUsage,
        group_tokens: &HashMap<u32, HashMap<&str, u64>>,
        groups: &mut Groups<'_, '_>,
        m: &CostMetrics,
    ) {
        let (shares, method) = process_shares(usage);
        m.splits
            .get_or_create(&SplitLabels {
                gpu: usage.gpu,
                method: method.label(),
            })
            .inc();
        let energy = usage.energy_j.unwrap_or(0.0);
        let busy = usage.busy_s.unwrap_or(0.0);
        let gpu = usage.gpu;
        let unattributed = |share: f64| {
            let l = GpuOnlyLabels { gpu };
            m.unattributed_energy
                .get_or_create(&l)
                .inc_by(share * energy);
            m.unattributed_seconds
                .get_or_create(&l)
                .inc_by(share * busy);
        };
        if shares.is_empty() {
            unattributed(1.0);
            return;
        }
        // Each group's part of this GPU, then its split between models, once per group.
        let mut parts: HashMap<u32, f64> = HashMap::new();
        for (pid, share) in shares {
            match groups.of(pid) {
                Some(g) => *parts.entry(g).or_default() += share,
                None => unattributed(share),
            }
        }
        for (g, part) in parts {
            let empty = HashMap::new();
            let tokens = group_tokens.get(&g).unwrap_or(&empty);
            let weights = self.model_weights(gpu, g, tokens, groups);
            let total: f64 = weights.iter().map(|(_, w)| w).sum();
            let workload = (groups.view.workload)(g);
            for (model, w) in weights {
                let l = CostLabels {
                    model,
                    gpu,
                    namespace: workload.namespace.clone(),
                    pod: workload.pod.clone(),
                };
                let f = part * w / total;
                m.energy.get_or_create(&l).inc_by(f * energy);
                m.seconds.get_or_create(&l).inc_by(f * busy);
                self.series.entry(l.model.clone()).or_default().insert(l);
            }
        }
    }

    /// The split of group `g`'s part of GPU `gpu` between its models: the tokens since this
    /// GPU's last interval, else all its tokens so far, else its command line's model.
    fn model_weights(
        &mut self,
        gpu: u32,
        g: u32,
        tokens: &HashMap<&str, u64>,
        groups: &mut Groups<'_, '_>,
    ) -> Vec<(String, f64)> {
        let mut recent = Vec::new();
        for (label, n) in tokens {
            let last = self
                .seen
                .insert((gpu, g, (*label).to_string()), *n)
                .unwrap_or(0);
            let d = n.saturating_sub(last);
            if d > 0 {
                recent.push(((*label).to_string(), d as f64));
            }
        }
        if !recent.is_empty() {
            return recent;
        }
        let ever: Vec<(String, f64)> = tokens
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(l, n)| ((*l).to_string(), *n as f64))
            .collect();
        if !ever.is_empty() {
            return ever;
        }
        let view = groups.view;
        let named = std::iter::once(g)
            .chain(
                view.servers
                    .keys()
                    .copied()
                    .filter(|s| groups.of(*s) == Some(g)),
            )
            .find_map(|s| (view.cmdline_label)(s));
        vec![(
            named.unwrap_or_else(|| super::models::UNKNOWN.to_string()),
            1.0,
        )]
    }

    /// Forgets what the gone servers' groups had seen.
    pub fn retain_groups(&mut self, keep: impl Fn(u32) -> bool) {
        self.seen.retain(|(_, g, _), _| keep(*g));
    }

    /// Forgets a model label that is no longer one, and removes its series.
    pub fn forget_model(&mut self, label: &str, m: &CostMetrics) {
        self.seen.retain(|(_, _, l), _| l != label);
        for l in self.series.remove(label).unwrap_or_default() {
            m.energy.remove(&l);
            m.seconds.remove(&l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuProcess;

    fn proc(pid: u32, sm: Option<u32>, used: Option<u64>) -> GpuProcess {
        GpuProcess {
            pid,
            gpu: 0,
            used_bytes: used,
            sm_util: sm,
        }
    }

    fn usage(processes: Vec<GpuProcess>) -> GpuUsage {
        GpuUsage {
            gpu: 0,
            ts_ns: 0,
            energy_j: Some(100.0),
            busy_s: Some(0.5),
            processes,
        }
    }

    #[test]
    fn processes_share_by_utilization_then_memory_then_equally() {
        let (s, m) = process_shares(&usage(vec![
            proc(1, Some(30), Some(1)),
            proc(2, Some(10), None),
        ]));
        assert_eq!((s, m), (vec![(1, 0.75), (2, 0.25)], Method::Utilization));
        let (s, m) = process_shares(&usage(vec![
            proc(1, Some(0), Some(300)),
            proc(2, None, Some(100)),
        ]));
        assert_eq!((s, m), (vec![(1, 0.75), (2, 0.25)], Method::Memory));
        let (s, m) = process_shares(&usage(vec![proc(1, None, None), proc(2, None, None)]));
        assert_eq!((s, m), (vec![(1, 0.5), (2, 0.5)], Method::Equal));
        let (s, m) = process_shares(&usage(vec![proc(7, None, None)]));
        assert_eq!((s, m), (vec![(7, 1.0)], Method::Alone));
        assert_eq!(process_shares(&usage(vec![])).1, Method::Nobody);
    }

    fn server(model: Option<&str>) -> Server {
        Server {
            kind: "vllm",
            model: model.map(str::to_string),
            ..Default::default()
        }
    }

    fn value(family: &Family<CostLabels, CounterF>, model: &str) -> f64 {
        family
            .get_or_create(&CostLabels {
                model: model.into(),
                gpu: 0,
                namespace: String::new(),
                pod: String::new(),
            })
            .get()
    }

    #[test]
    fn an_engine_process_is_paid_for_by_its_servers_models_by_their_tokens() {
        // Server 10 (two models) runs its engine as 11; server 20 is on the GPU itself; 30
        // is no server's. 11 and 20 share the GPU 3:1 by utilization, 30 has none.
        let servers = HashMap::from([(10, server(Some("a"))), (20, server(Some("b")))]);
        let parents = HashMap::from([(11u32, 10u32), (10, 1), (20, 1), (30, 1)]);
        let mut tokens = HashMap::from([
            ((10, "a".to_string()), 30u64),
            ((10, "a2".to_string()), 10),
            ((20, "b".to_string()), 5),
        ]);
        let parent = |p: u32| parents.get(&p).copied();
        let cmdline = |s: u32| servers.get(&s).and_then(|s| s.model.clone());
        let workload = |_| WorkloadLabels::default();
        let m = CostMetrics::default();
        let mut cost = GpuCost::default();
        let procs = vec![
            proc(11, Some(60), None),
            proc(20, Some(20), None),
            proc(30, Some(0), None),
        ];
        // One sampling round of GPU 0 with the tokens so far.
        let round = |cost: &mut GpuCost, tokens: &HashMap<(u32, String), u64>| {
            let view = View {
                tokens,
                servers: &servers,
                cmdline_label: &cmdline,
                parent: &parent,
                workload: &workload,
            };
            cost.attribute(&[usage(procs.clone())], &view, &m);
        };
        round(&mut cost, &tokens);
        let e = |model| value(&m.energy, model);
        assert!((e("a") - 56.25).abs() < 1e-9, "{}", e("a"));
        assert!((e("a2") - 18.75).abs() < 1e-9);
        assert!((e("b") - 25.0).abs() < 1e-9);
        assert!((value(&m.seconds, "a") - 0.28125).abs() < 1e-9);
        // Next interval: only a2 produced tokens on server 10.
        *tokens.get_mut(&(10, "a2".to_string())).unwrap() += 4;
        round(&mut cost, &tokens);
        assert!((e("a2") - (18.75 + 75.0)).abs() < 1e-9, "{}", e("a2"));
        assert!((e("a") - 56.25).abs() < 1e-9);
        // Then none at all: split as all tokens so far (server 20: all "b").
        round(&mut cost, &tokens);
        assert!((e("b") - 75.0).abs() < 1e-9, "{}", e("b"));
        assert!((e("a") - (56.25 + 75.0 * 30.0 / 44.0)).abs() < 1e-9);
    }

    #[test]
    fn a_server_without_tokens_pays_under_its_command_line_model_and_strangers_are_unattributed() {
        let servers = HashMap::from([(10, server(Some("named"))), (20, server(None))]);
        let tokens = HashMap::new();
        let parent = |_| Some(1);
        let cmdline = |s: u32| servers.get(&s).and_then(|s| s.model.clone());
        let workload = |_| WorkloadLabels::default();
        let view = View {
            tokens: &tokens,
            servers: &servers,
            cmdline_label: &cmdline,
            parent: &parent,
            workload: &workload,
        };
        let m = CostMetrics::default();
        let procs = vec![
            proc(10, None, None),
            proc(20, None, None),
            proc(99, None, None),
        ];
        GpuCost::default().attribute(&[usage(procs)], &view, &m);
        let third = 100.0 / 3.0;
        assert!((value(&m.energy, "named") - third).abs() < 1e-9);
        assert!((value(&m.energy, super::super::models::UNKNOWN) - third).abs() < 1e-9);
        let stranger = m
            .unattributed_energy
            .get_or_create(&GpuOnlyLabels { gpu: 0 })
            .get();
        assert!((stranger - third).abs() < 1e-9);
        let equal = SplitLabels {
            gpu: 0,
            method: "equal",
        };
        assert_eq!(m.splits.get_or_create(&equal).get(), 1);
    }
}
