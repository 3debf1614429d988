//! Link the core as a position-independent ELF whose entry point is the
//! loader-facing entry (`thinhv_abi::handoff::CORE_ENTRY_SYMBOL`).
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "none" {
        println!("cargo:rustc-link-arg-bins=--entry=thinhv_core_entry");
        println!("cargo:rustc-link-arg-bins=-z");
        println!("cargo:rustc-link-arg-bins=max-page-size=4096");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
