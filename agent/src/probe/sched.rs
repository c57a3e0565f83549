//! The `sched/sched_process_exit` tracepoint (exits of processes with CUDA activity).

use aya::{
    programs::{trace_point::TracePointLink, TracePoint},
    Ebpf,
};

use super::{links::Links, ProbeError};

const PROGRAM: &str = "sched_process_exit";

pub fn attach(ebpf: &mut Ebpf) -> Result<Links, ProbeError> {
    let mut links = Links::default();
    links.hold(attach_tracepoint(
        ebpf,
        PROGRAM,
        "sched",
        "sched_process_exit",
    )?);
    Ok(links)
}

/// Offset of `exit_code` in `struct task_struct`, from the kernel's BTF; 0 (exits reported
/// without their status) when it cannot be read, said once.
pub fn exit_code_offset() -> u32 {
    match super::btf::Btf::kernel()
        .map_err(|e| e.to_string())
        .and_then(|btf| {
            btf.offset("task_struct", "exit_code")
                .map_err(|e| e.to_string())
        }) {
        Ok(offset) => offset,
        Err(e) => {
            tracing::warn!(error = e, "no task_struct.exit_code in the kernel's BTF: process exits are reported without their status");
            0
        }
    }
}

/// Loads and attaches one tracepoint program of the object; the link is the caller's.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    event: &str,
) -> Result<TracePointLink, ProbeError> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })?;
    prog.load()
        .map_err(|source| ProbeError::Program { name, source })?;
    let attach_error = |source| ProbeError::Attach { name, source };
    let id = prog.attach(category, event).map_err(attach_error)?;
    prog.take_link(id).map_err(attach_error)
}

/// Offset of `group_dead` in the tracepoint record, from the kernel's format file; 0 (use the
/// group leader's exit) when the kernel lacks the field or tracefs cannot be read.
pub fn group_dead_offset() -> u32 {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let path = format!("{root}/events/sched/sched_process_exit/format");
        if let Ok(text) = std::fs::read_to_string(path) {
            return parse_group_dead_offset(&text).unwrap_or(0);
        }
    }
    // tracefs not mounted: the layout of kernels ≥ 6.16, which every kernel with the
    // field shares.
    if kernel_at_least(6, 16) {
        32
    } else {
        0
    }
}

fn parse_group_dead_offset(format: &str) -> Option<u32> {
    let line = format.lines().find(|l| l.contains(" group_dead;"))?;
    let rest = &line[line.find("offset:")? + 7..];
    rest[..rest.find(';')?].parse().ok()
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_group_dead_offset_from_format() {
        let f = "\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(parse_group_dead_offset(f), Some(32));
        assert_eq!(
            parse_group_dead_offset("field:pid_t pid;\toffset:24;"),
            None
        );
    }
}
