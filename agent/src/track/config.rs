//! The `[limits]` section: how many processes and allocations the tracker keeps.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Processes tracked at once; events of further processes are counted and dropped.
    pub max_processes: usize,
    /// Live allocations tracked per process; further ones are not tracked (neither pointer nor
    /// bytes), counted as `allocation_limit`.
    pub max_allocations_per_process: usize,
    /// Bytes the allocation ledger may hold for all processes together (one live allocation
    /// costs at most `track::ledger::ENTRY_BYTES`, 93); past it further allocations are not
    /// tracked, counted as `ledger_budget`. Worst case of the ledger: this plus
    /// `max_processes` empty process ledgers (352 bytes each): 65.4 MiB by default, where
    /// 4096 processes × 1M allocations used to allow 350 GiB.
    pub ledger_budget_bytes: usize,
    /// Longest `comm` label value.
    pub max_label_len: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_processes: 4096,
            max_allocations_per_process: 262_144,
            ledger_budget_bytes: 64 * 1024 * 1024,
            max_label_len: 64,
        }
    }
}
