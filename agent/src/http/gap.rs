//! The stretch when the family's probes were off (shed by the probe budget). Calls made then
//! were not seen, so a connection followed across it would pair a request with another one's
//! response, or time a request seen before it to an end seen after it. Every connection open
//! when the probes go off is therefore dropped, and no record stamped before they are back
//! in full is used: those left in the ring when they went off, and those of the re-attach
//! itself, when some of the family's calls were seen and others not. Connections are then
//! picked up as the ones older than the agent are (`Conn::joined`).

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// The probes have never been off, or records are used again.
    #[default]
    Seeing,
    Paused,
    /// Back in full at `at_ns`: earlier records are not used.
    Resumed {
        at_ns: u64,
    },
}

impl Gap {
    pub fn pause(&mut self) {
        *self = Gap::Paused;
    }

    pub fn resume(&mut self, at_ns: u64) {
        *self = Gap::Resumed { at_ns };
    }

    /// Whether a record stamped `ts_ns` (the probes' clock) is used.
    pub fn admits(&self, ts_ns: u64) -> bool {
        match *self {
            Gap::Seeing => true,
            Gap::Paused => false,
            Gap::Resumed { at_ns } => ts_ns >= at_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_before_the_probes_are_back_are_not_used() {
        let mut g = Gap::default();
        assert!(g.admits(5));
        g.pause();
        assert!(!g.admits(5), "left in the ring when the probes went off");
        assert!(!g.admits(u64::MAX));
        g.resume(100);
        assert!(!g.admits(99), "stamped during the re-attach");
        assert!(g.admits(100));
        assert!(g.admits(101));
        g.pause();
        assert!(!g.admits(101));
    }
}
