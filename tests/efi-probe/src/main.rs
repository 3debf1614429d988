//! The EFI probe. thinhv chain-loads it instead of an OS; it runs at CPL 0
//! in guest mode and reports, as `key=value` lines between
//! `THINHV-PROBE-BEGIN` and `THINHV-PROBE-END`, what it observes. The
//! integration tests on the host decide pass or fail from those values.
#![cfg_attr(target_os = "uefi", no_std, no_main)]

#[cfg(target_os = "uefi")]
extern crate alloc;

#[cfg(target_os = "uefi")]
#[allow(clippy::cast_possible_truncation, clippy::many_single_char_names)]
mod probe;

#[cfg(target_os = "uefi")]
mod apic;

#[cfg(target_os = "uefi")]
#[allow(clippy::cast_possible_truncation)]
mod dma;

#[cfg(target_os = "uefi")]
#[allow(clippy::cast_possible_truncation)]
mod attacks_hc;

#[cfg(target_os = "uefi")]
mod attacks_ipi;

#[cfg(target_os = "uefi")]
#[allow(clippy::cast_possible_truncation)]
mod attacks;

#[cfg(target_os = "uefi")]
mod timing;

#[cfg(target_os = "uefi")]
mod transparency;

#[cfg(target_os = "uefi")]
mod nmi;

#[cfg(not(target_os = "uefi"))]
fn main() {
    eprintln!("thinhv-probe is a UEFI application; `cargo xtask build` builds it");
}
