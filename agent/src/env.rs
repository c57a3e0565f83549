//! The process environment, read through one [`EnvSource`] so that tests never mutate the
//! real one and every variable the agent reads is visible in one place: the configuration's
//! `INFERSCOPE_*` keys, OTLP's `OTEL_*`, and the node and API server Kubernetes sets.

/// Where environment variables come from.
pub trait EnvSource {
    fn vars(&self) -> Vec<(String, String)>;

    /// One variable.
    fn var(&self, name: &str) -> Option<String> {
        self.vars()
            .into_iter()
            .find_map(|(k, v)| (k == name).then_some(v))
    }
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for Vec<(String, String)> {
    fn vars(&self) -> Vec<(String, String)> {
        self.clone()
    }
}

/// An environment of `pairs`, for tests.
#[cfg(test)]
pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_variable_of_a_test_environment() {
        let e = env(&[("A", "1"), ("B", "2")]);
        assert_eq!(e.var("B").as_deref(), Some("2"));
        assert_eq!(e.var("C"), None);
    }
}
