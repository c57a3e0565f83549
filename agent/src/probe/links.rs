//! Owned links of attached programs, released together. Each uprobe or tracepoint detach waits
//! in the kernel for an RCU grace period (about 0.1 s on a nested VM): 60 detaches one after
//! the other took 6 s of the shutdown. Released from several threads at once, they share grace
//! periods, and SIGTERM is answered within the deadline operators expect.

/// Links kept attached until [`Links::release`] (or drop, one by one).
#[derive(Default)]
pub struct Links(Vec<Box<dyn Send>>);

impl Links {
    pub fn hold<L: Send + 'static>(&mut self, link: L) {
        self.0.push(Box::new(link));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: Links) {
        self.0.extend(other.0);
    }

    /// Detaches every link, up to [`THREADS`] at a time.
    pub fn release(self) {
        release_all(self.0);
    }
}

/// Threads used to release links: enough that a grace period covers many detaches.
pub const THREADS: usize = 16;

fn release_all(links: Vec<Box<dyn Send>>) {
    if links.len() < 2 {
        return;
    }
    let per = links.len().div_ceil(THREADS);
    let mut links = links;
    std::thread::scope(|s| {
        while !links.is_empty() {
            let chunk: Vec<Box<dyn Send>> = links.drain(..per.min(links.len())).collect();
            let spawned = std::thread::Builder::new()
                .name("detach".into())
                .spawn_scoped(s, move || drop(chunk));
            if let Err(e) = spawned {
                // The chunk went with the failed closure and was dropped here, in order.
                tracing::debug!(error = %e, "detach thread not started");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::*;

    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn releases_every_link() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut links = Links::default();
        for _ in 0..50 {
            links.hold(Counted(n.clone()));
        }
        assert_eq!(links.len(), 50);
        links.release();
        assert_eq!(n.load(Ordering::SeqCst), 50);
    }
}
