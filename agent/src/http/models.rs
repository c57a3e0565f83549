//! Which model names become values of the `model` label. A request's body names whatever
//! model its client likes, so a name becomes a label value only once a server has shown that
//! it serves it: it answered a request naming it with success (2xx), or a watched server's
//! command line names it. Any other name is [`OTHER`].
//!
//! A name no request has named for `expiry` is forgotten (the tracker removes its series)
//! until a server answers it again, so the first names seen do not hold the label for the
//! agent's life; at most `max` names are admitted at once, command-line names first.
//!
//! A request's label is decided when it finishes, with its status. While it is in flight it
//! counts under the label its name has now (`other` before the name is admitted); when the
//! name is admitted, its requests still in flight move over (the in-flight count per name
//! this module keeps is what moves). A name with requests in flight never expires.

use std::collections::HashMap;

/// The label of every name that is not admitted.
pub const OTHER: &str = "other";
/// The label of a request that names no model, on a server whose command line names none.
pub const UNKNOWN: &str = "unknown";

/// Why a finished request's name is exported as [`OTHER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Folded {
    /// No server has answered it with success and no command line names it.
    Unserved,
    /// `max` names are admitted already.
    Limit,
}

impl Folded {
    /// The `reason` of `inferscope_dropped_total{what="model_label"}`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unserved => "unserved",
            Self::Limit => "limit",
        }
    }
}

/// What the answer to a request did to its name.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The name is a label value (admitted before, or [`UNKNOWN`]).
    Kept,
    /// The name is admitted from now on; `in_flight` requests naming it are still counted
    /// under [`OTHER`] and move to it.
    Admitted { in_flight: u32 },
    /// The request counts under [`OTHER`].
    Folded(Folded),
}

/// What a new list of command-line names did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Declared {
    /// Names admitted now, with their requests in flight (counted under [`OTHER`] so far).
    pub admitted: Vec<(String, u32)>,
    /// Names forgotten to make room for them (their series go).
    pub evicted: Vec<String>,
}

#[derive(Debug)]
struct Entry {
    /// When a request last named it (CLOCK_MONOTONIC ns), or it stopped being declared.
    last_ns: u64,
    /// A watched server's command line names it: kept while one does.
    declared: bool,
}

#[derive(Debug)]
pub struct Models {
    admitted: HashMap<String, Entry>,
    /// Requests in flight per name as they named it, admitted or not. A name leaves at 0,
    /// so this holds no more entries than there are requests in flight.
    in_flight: HashMap<String, u32>,
    max: usize,
    /// 0: names never expire.
    expiry_ns: u64,
}

impl Models {
    pub fn new(max: usize, expiry: std::time::Duration) -> Self {
        Self {
            admitted: HashMap::new(),
            in_flight: HashMap::new(),
            max,
            expiry_ns: u64::try_from(expiry.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Names admitted now.
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }

    /// The label `name` has now: itself when admitted (or [`UNKNOWN`]), else [`OTHER`].
    pub fn label<'a>(&self, name: &'a str) -> &'a str {
        if name == UNKNOWN || self.admitted.contains_key(name) {
            name
        } else {
            OTHER
        }
    }

    /// A request naming `name` was read in full (it is in flight until [`Models::left`]).
    pub fn received(&mut self, name: &str, now_ns: u64) {
        self.touch(name, now_ns);
        match self.in_flight.get_mut(name) {
            Some(n) => *n += 1,
            None => {
                self.in_flight.insert(name.to_string(), 1);
            }
        }
    }

    /// A request counted by [`Models::received`] is no longer in flight.
    pub fn left(&mut self, name: &str) {
        if let Some(n) = self.in_flight.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(name);
            }
        }
    }

    /// A request naming `name` finished with `status` (None: no status line came).
    pub fn answered(&mut self, name: &str, status: Option<u16>, now_ns: u64) -> Answer {
        if name == UNKNOWN || self.touch(name, now_ns) {
            return Answer::Kept;
        }
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            return Answer::Folded(Folded::Unserved);
        }
        if self.admitted.len() >= self.max {
            return Answer::Folded(Folded::Limit);
        }
        self.admitted.insert(
            name.to_string(),
            Entry {
                last_ns: now_ns,
                declared: false,
            },
        );
        Answer::Admitted {
            in_flight: self.in_flight_of(name),
        }
    }

    /// The names the watched servers' command lines give now. Each is admitted, making room
    /// if need be by forgetting the name a request named longest ago among those that no
    /// command line names and that have no request in flight; a name no longer given is
    /// kept until it expires.
    pub fn declare<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
        now_ns: u64,
    ) -> Declared {
        let names: std::collections::HashSet<&str> =
            names.into_iter().filter(|n| *n != UNKNOWN).collect();
        for (name, e) in &mut self.admitted {
            if e.declared && !names.contains(name.as_str()) {
                e.declared = false;
                e.last_ns = now_ns;
            }
        }
        let mut out = Declared::default();
        for name in names {
            if let Some(e) = self.admitted.get_mut(name) {
                e.declared = true;
                continue;
            }
            if self.admitted.len() >= self.max {
                let Some(victim) = self
                    .admitted
                    .iter()
                    .filter(|(n, e)| !e.declared && !self.in_flight.contains_key(n.as_str()))
                    .min_by_key(|(_, e)| e.last_ns)
                    .map(|(n, _)| n.clone())
                else {
                    continue;
                };
                self.admitted.remove(&victim);
                out.evicted.push(victim);
            }
            self.admitted.insert(
                name.to_string(),
                Entry {
                    last_ns: now_ns,
                    declared: true,
                },
            );
            out.admitted
                .push((name.to_string(), self.in_flight_of(name)));
        }
        out
    }

    /// Forgets the names that no command line gives, that no request has named for
    /// `expiry` and that have no request in flight; returns them (their series go).
    pub fn expire(&mut self, now_ns: u64) -> Vec<String> {
        if self.expiry_ns == 0 {
            return Vec::new();
        }
        let gone: Vec<String> = self
            .admitted
            .iter()
            .filter(|(n, e)| {
                !e.declared
                    && now_ns.saturating_sub(e.last_ns) > self.expiry_ns
                    && !self.in_flight.contains_key(n.as_str())
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            self.admitted.remove(n);
        }
        gone
    }

    /// Refreshes an admitted name; whether it is admitted.
    fn touch(&mut self, name: &str, now_ns: u64) -> bool {
        match self.admitted.get_mut(name) {
            Some(e) => {
                e.last_ns = e.last_ns.max(now_ns);
                true
            }
            None => false,
        }
    }

    fn in_flight_of(&self, name: &str) -> u32 {
        self.in_flight.get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    fn models(max: usize) -> Models {
        Models::new(max, Duration::from_secs(3600))
    }

    #[test]
    fn a_name_is_admitted_by_a_success_and_not_by_an_error() {
        let mut m = models(8);
        assert_eq!(m.label("llama"), OTHER);
        assert_eq!(
            m.answered("nope", Some(404), S),
            Answer::Folded(Folded::Unserved)
        );
        assert_eq!(
            m.answered("nope", None, S),
            Answer::Folded(Folded::Unserved)
        );
        assert_eq!(
            m.answered("nope", Some(500), S),
            Answer::Folded(Folded::Unserved)
        );
        assert_eq!(m.label("nope"), OTHER);
        assert_eq!(
            m.answered("llama", Some(200), S),
            Answer::Admitted { in_flight: 0 }
        );
        assert_eq!(m.label("llama"), "llama");
        // Once admitted, its errors keep the name too.
        assert_eq!(m.answered("llama", Some(429), 2 * S), Answer::Kept);
        assert_eq!(m.answered("llama", None, 2 * S), Answer::Kept);
        assert_eq!(m.len(), 1);
        // `unknown` (no model anywhere) is always a label value and takes no room.
        assert_eq!(m.label(UNKNOWN), UNKNOWN);
        assert_eq!(m.answered(UNKNOWN, Some(404), S), Answer::Kept);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn hundreds_of_names_answered_404_leave_the_label_as_it_was() {
        let mut m = models(256);
        m.declare(["served"], 0);
        for i in 0..300 {
            let name = format!("probe-{i}");
            m.received(&name, S);
            assert_eq!(m.label(&name), OTHER);
            m.left(&name);
            assert_eq!(
                m.answered(&name, Some(404), S),
                Answer::Folded(Folded::Unserved)
            );
        }
        assert_eq!(m.answered("served", Some(200), 2 * S), Answer::Kept);
        assert_eq!(m.len(), 1);
        assert!(m.in_flight.is_empty());
    }

    #[test]
    fn requests_in_flight_move_when_their_name_is_admitted() {
        let mut m = models(8);
        for _ in 0..3 {
            m.received("new", S);
        }
        assert_eq!(m.label("new"), OTHER);
        // The first of them ends with a success.
        m.left("new");
        assert_eq!(
            m.answered("new", Some(200), 2 * S),
            Answer::Admitted { in_flight: 2 }
        );
        assert_eq!(m.label("new"), "new");
        m.left("new");
        m.left("new");
        assert!(m.in_flight.is_empty());
        // A command line naming a model with requests in flight moves them too.
        m.received("cli", S);
        let d = m.declare(["cli"], 3 * S);
        assert_eq!(d.admitted, [("cli".to_string(), 1)]);
        assert!(d.evicted.is_empty());
    }

    #[test]
    fn names_not_seen_for_the_expiry_are_forgotten() {
        let mut m = Models::new(8, Duration::from_secs(60));
        m.declare(["cli"], 0);
        m.answered("a", Some(200), 0);
        m.answered("b", Some(200), 0);
        m.received("b", 50 * S);
        assert!(m.expire(59 * S).is_empty());
        // `a` is named no more; `b` has a request in flight; `cli` is on a command line.
        assert_eq!(m.expire(61 * S), ["a"]);
        assert_eq!(m.label("a"), OTHER);
        assert_eq!(m.label("b"), "b");
        m.left("b");
        assert_eq!(m.answered("b", Some(200), 100 * S), Answer::Kept);
        assert!(m.expire(159 * S).is_empty());
        assert_eq!(m.expire(161 * S), ["b"]);
        // A name no command line gives any more expires like the others, from then on.
        m.declare([], 200 * S);
        assert!(m.expire(259 * S).is_empty());
        assert_eq!(m.expire(261 * S), ["cli"]);
        assert!(m.is_empty());
        // Forgotten names come back with the next success.
        assert_eq!(
            m.answered("a", Some(200), 300 * S),
            Answer::Admitted { in_flight: 0 }
        );
        // Expiry 0: never.
        let mut m = Models::new(8, Duration::ZERO);
        m.answered("a", Some(200), 0);
        assert!(m.expire(u64::MAX).is_empty());
    }

    #[test]
    fn the_cap_holds_and_command_line_names_take_room_from_answered_ones() {
        let mut m = models(3);
        for (i, n) in ["a", "b", "c"].into_iter().enumerate() {
            m.answered(n, Some(200), i as u64 * S);
        }
        assert_eq!(
            m.answered("d", Some(200), 5 * S),
            Answer::Folded(Folded::Limit)
        );
        assert_eq!(m.label("d"), OTHER);
        assert_eq!(m.len(), 3);
        // A command line's name evicts the name seen longest ago with nothing in flight.
        m.received("a", 6 * S);
        let d = m.declare(["served"], 7 * S);
        assert_eq!(d.evicted, ["b"]);
        assert_eq!(m.label("served"), "served");
        assert_eq!(m.len(), 3);
        // Nothing left to evict: a further command-line name waits.
        let d = m.declare(["served", "x", "y", "z"], 8 * S);
        assert_eq!(d.evicted, ["c"]);
        assert_eq!(d.admitted.len(), 1);
        assert_eq!(m.len(), 3);
        for i in 0..1000 {
            m.answered(&format!("n{i}"), Some(200), 9 * S);
        }
        assert_eq!(m.len(), 3);
    }
}
