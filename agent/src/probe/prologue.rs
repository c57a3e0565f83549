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

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

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

/// A function that hands its work to another at once, as OpenSSL's exported `SSL_write`
/// hands it to `ssl_write_internal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wrapper {
    /// The address of the function called (in the base `address` was given in).
    pub callee: u64,
    /// The argument (System V index: 0 is `%rdi`) that holds an address in the wrapper's own
    /// stack frame at the call: an out parameter such as `&written`.
    pub frame_arg: Option<u8>,
}

/// The first direct call of a function whose first bytes are `code`, loaded at `address`, if
/// it is reached by straight-line code: only conditional branches (the argument checks that
/// leave for an error path) may come before it; a return, a jump or an indirect call first and
/// there is none.
pub fn first_call(code: &[u8], address: u64) -> Option<Wrapper> {
    let code = &code[..code.len().min(WINDOW)];
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut frame: Option<Register> = None;
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            return None;
        }
        let direct = matches!(i.op0_kind(), OpKind::NearBranch64);
        match i.flow_control() {
            FlowControl::Call if direct => {
                return Some(Wrapper {
                    callee: i.near_branch_target(),
                    frame_arg: frame.and_then(arg_index),
                });
            }
            FlowControl::ConditionalBranch if direct => continue,
            FlowControl::Next => {}
            _ => return None,
        }
        let writes = |r: Register| {
            info.info(&i).used_registers().iter().any(|u| {
                u.register().full_register() == r
                    && !matches!(
                        u.access(),
                        OpAccess::Read | OpAccess::CondRead | OpAccess::None
                    )
            })
        };
        if frame.is_some_and(writes) {
            frame = None;
        }
        if let Some(r) = frame_address(&i) {
            frame = Some(r);
        }
    }
    None
}

/// `mov %rsp, %reg` or `lea d(%rsp), %reg`: the register written, now an address in the frame.
fn frame_address(i: &Instruction) -> Option<Register> {
    if i.op_count() != 2 || i.op0_kind() != OpKind::Register {
        return None;
    }
    let from_rsp = match i.mnemonic() {
        Mnemonic::Mov => i.op1_kind() == OpKind::Register && i.op1_register() == Register::RSP,
        Mnemonic::Lea => i.memory_base() == Register::RSP && i.memory_index() == Register::None,
        _ => false,
    };
    let reg = i.op0_register();
    (from_rsp && reg.size() == 8).then_some(reg)
}

/// The System V argument index of a 64-bit register.
fn arg_index(r: Register) -> Option<u8> {
    [
        Register::RDI,
        Register::RSI,
        Register::RDX,
        Register::RCX,
        Register::R8,
        Register::R9,
    ]
    .iter()
    .position(|a| *a == r)
    .map(|i| i as u8)
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

    /// `SSL_write` of Debian's OpenSSL 3.0: `sub $0x18,%rsp`, the stack guard, `test %edx,%edx`,
    /// `js` (a negative length), `mov %rsp,%rcx` (`&written`), `movslq %edx,%rdx`,
    /// `call ssl_write_internal`.
    const SSL_WRITE_30: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00, 0x48, 0x89,
        0x44, 0x24, 0x08, 0x31, 0xc0, 0x85, 0xd2, 0x78, 0x2f, 0x48, 0x89, 0xe1, 0x48, 0x63, 0xd2,
        0xe8, 0xfd, 0xfb, 0xff, 0xff, 0x85, 0xc0,
    ];

    #[test]
    fn finds_what_a_wrapper_calls_and_its_out_parameter() {
        assert_eq!(
            first_call(SSL_WRITE_30, 0x35980),
            Some(Wrapper {
                callee: 0x355a0,
                frame_arg: Some(3)
            })
        );
        // `SSL_write_ex` of the same library: `sub $8,%rsp; call ssl_write_internal`, its
        // own fourth argument passed on.
        assert_eq!(
            first_call(
                &[0x48, 0x83, 0xec, 0x08, 0xe8, 0x87, 0xfb, 0xff, 0xff],
                0x35a10
            ),
            Some(Wrapper {
                callee: 0x355a0,
                frame_arg: None
            })
        );
        // OpenSSL 3.2's shape: flags in `%rcx`, `lea 8(%rsp),%r8`, then the call.
        assert_eq!(
            first_call(
                &[0x31, 0xc9, 0x4c, 0x8d, 0x44, 0x24, 0x08, 0xe8, 0x00, 0x01, 0x00, 0x00],
                0x1000
            ),
            Some(Wrapper {
                callee: 0x110c,
                frame_arg: Some(4)
            })
        );
        // The frame's address overwritten before the call is no out parameter.
        assert_eq!(
            first_call(&[0x48, 0x89, 0xe1, 0x31, 0xc9, 0xe8, 0, 0, 0, 0], 0x1000),
            Some(Wrapper {
                callee: 0x100a,
                frame_arg: None
            })
        );
    }

    #[test]
    fn no_call_behind_a_jump_a_return_or_an_indirect_call() {
        // jmp +0; call +0
        assert_eq!(first_call(&[0xeb, 0x00, 0xe8, 0, 0, 0, 0], 0x1000), None);
        // ret
        assert_eq!(first_call(&[0xc3, 0xe8, 0, 0, 0, 0], 0x1000), None);
        // call *%rax
        assert_eq!(first_call(&[0xff, 0xd0], 0x1000), None);
        // The driver's stub: cmpl, je, jmp *.
        assert_eq!(first_call(DRIVER_STUB, 0x2d5660), None);
        assert_eq!(first_call(&[], 0x1000), None);
        assert_eq!(first_call(&[0x48, 0x83], 0x1000), None);
    }

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
