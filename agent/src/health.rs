//! What `/healthz` answers. 503 until the probes are attached, and 503 naming any long-running
//! stage whose heartbeat is overdue (a stage stuck in a call a tenant made hang, or one that
//! died): a liveness probe then restarts the agent. A probe family that could not start is
//! not a reason to restart (it would fail the same way again): the agent stays up, 200, and
//! the body names the degraded families so an operator reading the probe sees why.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// The least deadline of a stage that does only in-process work between beats (the reader,
/// the trackers, the forensics writer, the NVML calls): a loaded node can delay a beat by
/// seconds, and a false 503 restarts the agent.
pub const QUICK: Duration = Duration::from_secs(10);
/// The least deadline of a stage that reads other processes' files or talks to the network
/// between beats (discovery, the scraper, attribution).
pub const SLOW: Duration = Duration::from_secs(30);

/// The deadline of a stage that beats at least once per `period`: three periods, at least
/// `floor`.
pub fn deadline(period: Duration, floor: Duration) -> Duration {
    period.saturating_mul(3).max(floor)
}

/// Runs `task`, beating `heartbeat` every `every` while it is pending, and says done when it
/// ends. For a task that awaits the network for long stretches and does nothing else: it beats
/// as long as it is polled, so it stops only when it blocks the thread it runs on, which is
/// what a hang is for such a task.
pub async fn beating<F: std::future::Future>(
    heartbeat: Heartbeat,
    every: Duration,
    task: F,
) -> F::Output {
    let mut task = std::pin::pin!(task);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut task => {
                heartbeat.done();
                return out;
            }
            _ = tick.tick() => heartbeat.beat(),
        }
    }
}

#[derive(Debug)]
struct Beat {
    stage: &'static str,
    deadline: Duration,
    /// Milliseconds since [`Health::start`] of the last beat.
    last_ms: AtomicU64,
    /// Set when the stage ended on purpose (shutdown): no longer expected to beat.
    done: AtomicBool,
}

/// A stage's side of its heartbeat. A stage that hangs or dies stops beating and `/healthz`
/// turns 503; one that ends on purpose (shutdown) says [`Heartbeat::done`].
#[derive(Debug, Clone)]
pub struct Heartbeat {
    beat: Arc<Beat>,
    start: Instant,
}

impl Heartbeat {
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.beat.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The stage has ended on purpose (shutdown); it is no longer checked.
    pub fn done(&self) {
        self.beat.done.store(true, Ordering::Relaxed);
    }

    /// Whether the stage has said [`Heartbeat::done`].
    pub fn is_done(&self) -> bool {
        self.beat.done.load(Ordering::Relaxed)
    }
}

/// A heartbeat that is never checked, for stages started outside the agent (tests, bench).
impl Default for Heartbeat {
    fn default() -> Self {
        let beat = Arc::new(Beat {
            stage: "unchecked",
            deadline: Duration::MAX,
            last_ms: AtomicU64::new(0),
            done: AtomicBool::new(true),
        });
        Self {
            beat,
            start: Instant::now(),
        }
    }
}

#[derive(Debug)]
pub struct Health {
    start: Instant,
    ready: AtomicBool,
    degraded: Mutex<Vec<(&'static str, String)>>,
    beats: Mutex<Vec<Arc<Beat>>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/healthz` says.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub body: String,
}

impl Health {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ready: AtomicBool::new(false),
            degraded: Mutex::new(Vec::new()),
            beats: Mutex::new(Vec::new()),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// A probe family that could not start, with the one-line reason.
    pub fn degrade(&self, family: &'static str, reason: String) {
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|(f, _)| *f != family);
        d.push((family, reason));
    }

    /// The family works again (the budget re-attached it).
    pub fn restore(&self, family: &str) {
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|(f, _)| *f != family);
    }

    pub fn degraded(&self) -> Vec<(&'static str, String)> {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Registers a stage that must beat at least once per `deadline`; it counts as having
    /// beaten now.
    pub fn heartbeat(&self, stage: &'static str, deadline: Duration) -> Heartbeat {
        let beat = Arc::new(Beat {
            stage,
            deadline,
            last_ms: AtomicU64::new(self.start.elapsed().as_millis() as u64),
            done: AtomicBool::new(false),
        });
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(beat.clone());
        Heartbeat {
            beat,
            start: self.start,
        }
    }

    /// Stages whose last beat is older than their deadline, with how long ago it was.
    pub fn overdue(&self) -> Vec<(&'static str, Duration)> {
        let now = self.start.elapsed();
        let beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats
            .iter()
            .filter(|b| !b.done.load(Ordering::Relaxed))
            .filter_map(|b| {
                let since =
                    now.saturating_sub(Duration::from_millis(b.last_ms.load(Ordering::Relaxed)));
                (since > b.deadline).then_some((b.stage, since))
            })
            .collect()
    }

    pub fn verdict(&self) -> Verdict {
        if !self.ready.load(Ordering::Acquire) {
            return Verdict {
                ok: false,
                body: "starting\n".into(),
            };
        }
        let overdue = self.overdue();
        let mut body = String::new();
        for (stage, since) in &overdue {
            body.push_str(&format!(
                "stalled: {stage} (no heartbeat for {:.1} s)\n",
                since.as_secs_f64()
            ));
        }
        for (family, reason) in self.degraded() {
            body.push_str(&format!("degraded: {family} ({reason})\n"));
        }
        if overdue.is_empty() {
            body.insert_str(0, "ok\n");
        }
        Verdict {
            ok: overdue.is_empty(),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_then_ok() {
        let h = Health::new();
        assert!(!h.verdict().ok);
        assert_eq!(h.verdict().body, "starting\n");
        h.set_ready();
        assert_eq!(
            h.verdict(),
            Verdict {
                ok: true,
                body: "ok\n".into()
            }
        );
    }

    #[test]
    fn degraded_families_are_named_but_healthy() {
        let h = Health::new();
        h.set_ready();
        h.degrade("http", "tracefs is not mounted".into());
        h.degrade("http", "tracefs is not mounted (again)".into());
        let v = h.verdict();
        assert!(v.ok);
        assert_eq!(
            v.body,
            "ok\ndegraded: http (tracefs is not mounted (again))\n"
        );
        h.degrade("cuda", "no uprobes".into());
        h.restore("http");
        assert_eq!(h.verdict().body, "ok\ndegraded: cuda (no uprobes)\n");
    }

    #[tokio::test]
    async fn a_waiting_task_beats_and_is_done_when_it_ends() {
        let h = Health::new();
        h.set_ready();
        let beat = h.heartbeat("apiserver", Duration::from_millis(100));
        let waited = beating(beat, Duration::from_millis(10), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            h.verdict().ok
        })
        .await;
        assert!(waited, "a task that awaits is alive");
        std::thread::sleep(Duration::from_millis(150));
        assert!(h.verdict().ok, "a task that has ended is not checked");
    }

    #[test]
    fn deadlines_are_three_periods_with_a_floor() {
        assert_eq!(deadline(Duration::from_millis(5), QUICK), QUICK);
        assert_eq!(
            deadline(Duration::from_secs(15), SLOW),
            Duration::from_secs(45)
        );
        assert_eq!(deadline(Duration::MAX, SLOW), Duration::MAX);
    }

    #[test]
    fn an_overdue_stage_fails_the_check_until_it_beats() {
        let h = Health::new();
        h.set_ready();
        let fast = h.heartbeat("tracker", Duration::from_millis(20));
        let slow = h.heartbeat("nvml-sampler", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(60));
        let v = h.verdict();
        assert!(!v.ok);
        assert!(
            v.body.starts_with("stalled: tracker (no heartbeat for"),
            "{}",
            v.body
        );
        assert!(!v.body.contains("nvml-sampler"));
        fast.beat();
        assert!(h.verdict().ok);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.verdict().ok);
        assert!(!fast.is_done());
        fast.done();
        assert!(fast.is_done());
        assert!(h.verdict().ok);
        slow.beat();
    }
}
