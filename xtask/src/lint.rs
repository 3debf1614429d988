//! `cargo xtask lint`: formatting and clippy on every target the code
//! builds for.
use crate::{root, sh};
use std::process::Command;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run() -> Result<(), String> {
    crate::deps::rust_targets()?;
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh(cargo().args([
        "clippy",
        "-p",
        "thin-hv",
        "-p",
        "thin-hv-core",
        "--target",
        "x86_64-unknown-none",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh(cargo().args([
        "clippy",
        "-p",
        "thinhv-efi",
        "-p",
        "thinhv-probe",
        "--target",
        "x86_64-unknown-uefi",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("xtask: lint clean");
    Ok(())
}
