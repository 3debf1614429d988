//! `cargo xtask run`: OVMF → thinhv → Debian Linux, on this terminal.
use crate::artifacts;
use crate::root;
use std::time::Duration;
use thinhv_ovmf::esp::{self, Esp};
use thinhv_ovmf::qemu::{self, Profile, Serial};
use thinhv_ovmf::{firmware, linux};

/// Longest interactive session before QEMU is stopped (every emulator run
/// sits under a timeout; `--timeout SECONDS` changes it).
const DEFAULT_TIMEOUT: Duration = Duration::from_hours(1);

pub fn run(args: &[String]) -> Result<(), String> {
    let mut smp = 2u32;
    let mut hv = true;
    let mut append = String::new();
    let mut timeout = DEFAULT_TIMEOUT;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smp" => {
                smp = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--smp needs a number")?;
            }
            "--no-hv" => hv = false,
            "--append" => append = it.next().cloned().ok_or("--append needs arguments")?,
            "--timeout" => {
                timeout = Duration::from_secs(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--timeout needs seconds")?,
                );
            }
            other => return Err(format!("unknown option {other:?} (see cargo xtask help)")),
        }
    }
    crate::deps::ensure()?;
    let a = artifacts::build()?;
    a.print();
    let build = root().join("build");
    let img = linux::prepare(&build.join("cache"), &a.tool)?;
    let esp_dir = build.join("run-esp");
    let esp = Esp::create(&esp_dir).map_err(|e| e.to_string())?;
    esp.install_linux(&img).map_err(|e| e.to_string())?;
    let options = esp::kernel_options(&format!("quiet {append}"));
    let mut config = esp::config_booting(esp::KERNEL, Some(&options), "");
    if !hv {
        config = config.replace("[hypervisor]\n", "[hypervisor]\nenabled = false\n");
    }
    esp.install_thinhv(&a.efi, Some(&config))
        .map_err(|e| e.to_string())?;
    let ovmf = firmware::find()?;
    let vars = build.join("run-vars.fd");
    std::fs::copy(&ovmf.vars, &vars).map_err(|e| e.to_string())?;
    let mut cmd = qemu::command(
        &ovmf,
        &vars,
        &esp_dir,
        &Profile::svm(smp),
        &Serial::Terminal,
    );
    println!(
        "\nxtask: booting OVMF -> {}Linux with {smp} CPUs.",
        if hv { "thinhv -> " } else { "" }
    );
    println!("xtask: at the shell try `thinhv status`; leave with `poweroff -f` or Ctrl-A then X.");
    println!("xtask: QEMU is stopped after {} s.\n", timeout.as_secs());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", qemu::binary().display()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            println!("\nxtask: QEMU exited ({s})");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "QEMU stopped after the {} s timeout",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
