//! The core as a freestanding ELF (`x86_64-unknown-none`). Everything is in
//! the library; this file only exists so that the ELF has an entry.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
pub use thin_hv::arch::entry::thinhv_core_entry;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "thin-hv is the hypervisor core, built for x86_64-unknown-none and embedded in thinhv.efi; \
         run `cargo xtask build`"
    );
}
