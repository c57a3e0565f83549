//! inferscope's eBPF programs. One module per probe family under `probes/`; the ring buffer,
//! the lost-event counters and the run-time config shared by all families live in `maps.rs`.
#![no_std]
#![no_main]

mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
