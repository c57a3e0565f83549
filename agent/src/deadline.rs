//! The shutdown's deadline. SIGTERM must end the agent within 5 s whatever a tenant did, and a
//! stage can be stuck in a call that never returns (an NVML call on a wedged driver, an open
//! of a file a tenant planted): such a stage must hold up neither the others nor the exit.
//! Each stage is waited for at most its share and never past the deadline; one that has not
//! finished is named in the log and left behind, and the process exits anyway. That is safe
//! because the kernel detaches every probe when the process's descriptors close.
//!
//! Thread joins poll [`std::thread::JoinHandle::is_finished`] instead of blocking, so a wait
//! never holds a runtime thread and the timer can always cut it short.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// How often a thread join looks again.
const JOIN_POLL: Duration = Duration::from_millis(10);

/// The end of the shutdown, and the stages that missed it.
#[derive(Debug)]
pub struct Deadline {
    end: Instant,
    late: Vec<&'static str>,
}

impl Deadline {
    /// Ends `within` after `start`.
    pub fn new(start: Instant, within: Duration) -> Self {
        Self {
            end: start + within,
            late: Vec::new(),
        }
    }

    /// Time left until the deadline (zero past it).
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    /// Stages that did not finish in time, in the order they were waited for.
    pub fn late(&self) -> &[&'static str] {
        &self.late
    }

    /// Waits for `fut` at most `share`, never past the deadline (past it, a future that is
    /// ready still gives its output: it is polled once). `None`, and `stage` noted late, when
    /// it did not finish.
    pub async fn wait<F: Future>(
        &mut self,
        stage: &'static str,
        share: Duration,
        fut: F,
    ) -> Option<F::Output> {
        let limit = share.min(self.remaining());
        match tokio::time::timeout(limit, fut).await {
            Ok(out) => Some(out),
            Err(_) => {
                tracing::warn!(
                    stage,
                    waited_s = limit.as_secs_f64(),
                    "stage did not stop in time; left behind"
                );
                self.late.push(stage);
                None
            }
        }
    }

    /// As [`Deadline::wait`] for a task; a task that is late is aborted (it ends at its next
    /// await, if it ever reaches one).
    pub async fn task<T>(
        &mut self,
        stage: &'static str,
        share: Duration,
        mut task: tokio::task::JoinHandle<T>,
    ) -> Option<Result<T, tokio::task::JoinError>> {
        let out = self.wait(stage, share, &mut task).await;
        if out.is_none() {
            task.abort();
        }
        out
    }

    /// As [`Deadline::wait`] for a thread; a thread that is late is detached.
    pub async fn join<T>(
        &mut self,
        stage: &'static str,
        share: Duration,
        thread: std::thread::JoinHandle<T>,
    ) -> Option<std::thread::Result<T>> {
        self.wait(stage, share, join(thread)).await
    }
}

/// Waits for a thread without blocking the caller's runtime thread.
pub async fn join<T>(thread: std::thread::JoinHandle<T>) -> std::thread::Result<T> {
    while !thread.is_finished() {
        tokio::time::sleep(JOIN_POLL).await;
    }
    thread.join()
}

/// Ends the process with status 0 at `at` if it is still running then: the last resort for a
/// shutdown whose own waits cannot run (every runtime thread stuck in a call).
pub fn watchdog(at: Instant) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            tracing::error!(
                "shutdown passed its deadline; exiting (the kernel detaches the probes)"
            );
            crate::held::continue_all();
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the shutdown watchdog");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn finished_stages_are_not_late() {
        let mut d = Deadline::new(Instant::now(), LONG);
        assert_eq!(d.wait("a", LONG, async { 7 }).await, Some(7));
        let t = tokio::spawn(async { 8 });
        assert_eq!(d.task("b", LONG, t).await.map(Result::unwrap), Some(8));
        let th = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(30));
            9
        });
        assert_eq!(d.join("c", LONG, th).await.map(Result::unwrap), Some(9));
        assert!(d.late().is_empty());
    }

    #[tokio::test]
    async fn a_stuck_stage_gets_its_share_and_is_named() {
        let mut d = Deadline::new(Instant::now(), LONG);
        let start = Instant::now();
        let out = d
            .wait(
                "stuck",
                Duration::from_millis(50),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(out, None);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(start.elapsed() < LONG);
        assert_eq!(d.late(), ["stuck"]);
    }

    #[tokio::test]
    async fn nothing_waits_past_the_deadline() {
        let start = Instant::now();
        let mut d = Deadline::new(start, Duration::from_millis(100));
        // Every share is longer than the whole deadline: the deadline wins, for each stage.
        for stage in ["one", "two", "three"] {
            assert_eq!(
                d.wait(stage, LONG, std::future::pending::<()>()).await,
                None
            );
        }
        assert!(start.elapsed() < LONG);
        assert_eq!(d.late(), ["one", "two", "three"]);
        assert_eq!(d.remaining(), Duration::ZERO);
        // Past the deadline a stage that has finished is still collected.
        assert_eq!(d.wait("done", LONG, async { 1 }).await, Some(1));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let th = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        drop(tx);
        while !th.is_finished() {
            std::thread::yield_now();
        }
        assert!(d.join("ended", LONG, th).await.is_some());
        assert_eq!(d.late().len(), 3);
    }

    #[tokio::test]
    async fn a_late_thread_is_left_and_a_late_task_aborted() {
        let mut d = Deadline::new(Instant::now(), LONG);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let th = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        assert!(d
            .join("blocked", Duration::from_millis(30), th)
            .await
            .is_none());
        // The thread is still blocked and is released without anyone joining it.
        tx.send(()).unwrap();

        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _guard = dropped_tx;
            std::future::pending::<()>().await
        });
        assert!(d
            .task("pending", Duration::from_millis(30), task)
            .await
            .is_none());
        // Aborting drops the task's future, and with it the sender.
        assert!(dropped_rx.await.is_err());
        assert_eq!(d.late(), ["blocked", "pending"]);
    }
}
