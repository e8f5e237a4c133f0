//! Program entry points. Every map is a `#[map]` static (never `static mut`).
use aya_ebpf::{
    bindings::tcx_action_base::TCX_NEXT,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use shunt_abi::{Counter, stat};

#[map(name = "SHUNT_STATS")]
static SHUNT_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// tcx ingress hook. `TCX_NEXT` hands the packet on to the next program in the chain
/// (kernel include/uapi/linux/bpf.h, enum tcx_action_base), so other tcx users keep working.
#[classifier]
pub fn shunt_tc_ingress(ctx: TcContext) -> i32 {
    if let Some(c) = SHUNT_STATS.get_ptr_mut(stat::PACKETS_SEEN) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    TCX_NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
