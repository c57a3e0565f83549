//! Where a function's entry probe goes. The kernel replaces the probed instruction with a
//! breakpoint and then either emulates the instruction (`push %reg`, direct branches and
//! calls), turns a 5-byte nop into a call, or single-steps the instruction out of line: a trap
//! more, which on a VM costs microseconds per hit. NVIDIA's driver begins its exported
//! functions with a `cmpl $imm, <rip-relative>` (single-stepped) followed by a `je`
//! (emulated). A `cmp` or `test` changes nothing but the flags, so a probe placed on the
//! instruction after it reads the same argument registers and sees the caller's return
//! address on top of the stack: the return probe still hijacks the right return. The probe
//! moves there only when that instruction is one the kernel emulates and no branch of the
//! function lands on it (which would count a call twice); otherwise it stays on the first
//! byte.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};

use super::elf::FirstInstruction;

/// Bytes of a function looked at (for the jump-target check): driver entry points are stubs
/// far shorter than this.
pub const WINDOW: usize = 256;

/// Where the entry probe goes: `skip` bytes into the function, on an instruction of kind
/// `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub skip: u64,
    pub first: FirstInstruction,
}

/// The placement for a function whose first bytes are `code` (at most its size), loaded at
/// `address` (any base: only distances within `code` matter).
pub fn place(code: &[u8], address: u64) -> Placement {
    let first = FirstInstruction::classify(code);
    let at_entry = Placement { skip: 0, first };
    if first != FirstInstruction::SingleStep {
        return at_entry;
    }
    let code = &code[..code.len().min(WINDOW)];
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let head = decoder.decode();
    if head.is_invalid() || !flags_only(&head) || !decoder.can_decode() {
        return at_entry;
    }
    let next = decoder.decode();
    let Some(kind) = emulated(&next, &code[head.len()..]) else {
        return at_entry;
    };
    if lands_on(code, address, next.ip()) {
        return at_entry;
    }
    Placement {
        skip: head.len() as u64,
        first: kind,
    }
}

/// `cmp` and `test` write no operand, only the flags.
fn flags_only(i: &Instruction) -> bool {
    matches!(i.mnemonic(), Mnemonic::Cmp | Mnemonic::Test)
}

/// How the kernel runs `i` (whose bytes start `code`) when it is probed, if not single-stepped.
fn emulated(i: &Instruction, code: &[u8]) -> Option<FirstInstruction> {
    if i.is_invalid() {
        return None;
    }
    let direct = matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    );
    match i.flow_control() {
        FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
            if direct =>
        {
            Some(FirstInstruction::Emulated)
        }
        _ => match FirstInstruction::classify(code) {
            FirstInstruction::SingleStep => None,
            kind => Some(kind),
        },
    }
}

/// Whether a direct branch in `code` (the function from its start) targets `ip`.
fn lands_on(code: &[u8], address: u64, ip: u64) -> bool {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            // Past the function's end, or data: what follows is not its code.
            break;
        }
        if matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) && i.near_branch_target() == ip
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cuMemAlloc_v2` of the 535 driver: `cmpl $0x321cba00, 0x193351e(%rip)`, `je +0xc`,
    /// `jmp *0x183b8ae(%rip)`, padding, `mov $4, %eax`, `ret`.
    const DRIVER_STUB: &[u8] = &[
        0x81, 0x3d, 0x1e, 0x35, 0x93, 0x01, 0x00, 0xba, 0x1c, 0x32, 0x74, 0x0c, 0xff, 0x25, 0xae,
        0xb8, 0x83, 0x01, 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0xb8, 0x04, 0x00, 0x00, 0x00, 0xc3,
    ];

    #[test]
    fn the_drivers_stub_is_probed_on_its_je() {
        assert_eq!(
            place(DRIVER_STUB, 0x2d5660),
            Placement {
                skip: 10,
                first: FirstInstruction::Emulated
            }
        );
    }

    #[test]
    fn probes_that_need_no_help_stay_on_the_first_byte() {
        for (code, first) in [
            (
                &[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55][..],
                FirstInstruction::Nop5,
            ),
            (&[0x55, 0x48, 0x89, 0xe5][..], FirstInstruction::Emulated),
        ] {
            assert_eq!(place(code, 0x1000), Placement { skip: 0, first });
        }
    }

    #[test]
    fn refuses_what_cannot_be_shown_safe() {
        let single = |code: &[u8]| {
            assert_eq!(
                place(code, 0x1000),
                Placement {
                    skip: 0,
                    first: FirstInstruction::SingleStep
                },
                "{code:02x?}"
            )
        };
        // endbr64; push %rbp: endbr64 is not a flags-only instruction.
        single(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55]);
        // sub $8, %rsp; push %rbx: the stack moves before the candidate.
        single(&[0x48, 0x83, 0xec, 0x08, 0x53]);
        // cmp %esi, %edi; mov %edi, %eax: the next one is single-stepped too.
        single(&[0x39, 0xf7, 0x89, 0xf8]);
        // cmp %esi, %edi; je +0; a loop back onto the je: `jmp -4` lands on it.
        single(&[0x39, 0xf7, 0x74, 0x00, 0xeb, 0xfc]);
        // A truncated instruction.
        single(&[0x81, 0x3d, 0x1e]);
        single(&[]);
    }
}
