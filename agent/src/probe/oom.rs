//! The `oom` family: `oom/mark_victim`, the kernel OOM killer's choice of victim.

use aya::Ebpf;

use super::{links::Links, sched::attach_tracepoint, ProbeError};

/// Field offsets the program reads, as the kernel's format file must show them.
const EXPECTED: &[(&str, u32)] = &[
    (" pid;", 8),
    (" comm;", 12),
    (" total_vm;", 16),
    (" anon_rss;", 24),
    (" file_rss;", 32),
    (" shmem_rss;", 40),
    (" uid;", 48),
    (" pgtables;", 56),
    (" oom_score_adj;", 64),
];

/// Attaches when the tracepoint's layout is the one the program reads; a kernel with another
/// layout gets no OOM-kill reports rather than wrong ones.
pub fn attach(ebpf: &mut Ebpf) -> Result<Links, ProbeError> {
    let mut links = Links::default();
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| {
            std::fs::read_to_string(format!("{root}/events/oom/mark_victim/format")).ok()
        });
    if let Some(format) = &format {
        if !layout_matches(format) {
            tracing::warn!("oom/mark_victim has an unknown layout on this kernel: host OOM kills are not reported");
            return Ok(links);
        }
    }
    links.hold(attach_tracepoint(
        ebpf,
        "oom_mark_victim",
        "oom",
        "mark_victim",
    )?);
    Ok(links)
}

fn layout_matches(format: &str) -> bool {
    EXPECTED.iter().all(|(field, offset)| {
        format
            .lines()
            .find(|l| l.contains(field))
            .is_some_and(|l| l.contains(&format!("offset:{offset};")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_layout() {
        let good = "\tfield:int pid;\toffset:8;\tsize:4;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\n\
            \tfield:unsigned long total_vm;\toffset:16;\n\tfield:unsigned long anon_rss;\toffset:24;\n\
            \tfield:unsigned long file_rss;\toffset:32;\n\tfield:unsigned long shmem_rss;\toffset:40;\n\
            \tfield:uid_t uid;\toffset:48;\n\tfield:unsigned long pgtables;\toffset:56;\n\
            \tfield:short oom_score_adj;\toffset:64;\n";
        assert!(layout_matches(good));
        assert!(!layout_matches(&good.replace("offset:64", "offset:60")));
        assert!(!layout_matches("\tfield:int pid;\toffset:8;\n"));
    }
}
