//! `cargo xtask fuzz [SECONDS]`: runs each `cargo fuzz` target of
//! `passthrough/fuzz` for SECONDS (default 60), seeded with the golden
//! tables. libFuzzer needs nightly Rust and cargo-fuzz; without them this
//! prints what to install and fails (CI, on stable, runs the mutation tests
//! in `passthrough/tests/mutations.rs` instead).
use std::path::Path;
use std::process::Command;

const TARGETS: [(&str, &[&str]); 6] = [
    ("dmar", &["dmar"]),
    ("ivrs", &["ivrs"]),
    ("ext_caps", &[]),
    ("mediation", &[]),
    ("vvtd", &[]),
    ("vamdvi", &[]),
];

pub fn run(args: &[String]) -> Result<(), String> {
    let secs: u64 = match args.first() {
        Some(s) => s
            .parse()
            .map_err(|_| format!("cargo xtask fuzz [SECONDS]: {s:?} is not a number"))?,
        None => 60,
    };
    let have = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    if !have(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))
        || !have(Command::new("cargo").args(["fuzz", "--version"]))
    {
        return Err("fuzzing needs nightly Rust and cargo-fuzz:\n  rustup toolchain install nightly\n  cargo install cargo-fuzz --locked".into());
    }
    let dir = crate::root().join("passthrough/fuzz");
    let data = crate::root().join("passthrough/tests/data");
    for (target, exts) in TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        seed(&data, exts, &corpus)?;
        println!("== fuzz {target} for {secs} s");
        let st = Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .args(["--", &format!("-max_total_time={secs}")])
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!(
                "fuzz target {target} failed; the input is in passthrough/fuzz/artifacts/{target}"
            ));
        }
    }
    println!("xtask: every fuzz target ran {secs} s without a failure");
    Ok(())
}

fn seed(data: &Path, exts: &[&str], corpus: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(data).map_err(|e| format!("{}: {e}", data.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let matches = p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| exts.contains(&x));
        if matches && let Some(name) = p.file_name() {
            std::fs::copy(&p, corpus.join(name)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
