//! `thinhv.efi`: see `app/` (built only for the UEFI target).
#![cfg_attr(target_os = "uefi", no_std, no_main)]

#[cfg(target_os = "uefi")]
extern crate alloc;

#[cfg(target_os = "uefi")]
mod app;

#[cfg(not(target_os = "uefi"))]
fn main() {
    eprintln!("thinhv.efi is a UEFI application; build it with `cargo xtask build`");
}
