//! `cargo xtask soak N`: boots Linux under thinhv N times in a row (SMP 4,
//! the igb behind a root port and an NVMe disk, as the device tests use
//! them) in test mode, and reports every run that fails or misses its end
//! marker with the harness's hang report (where each CPU was, the kernel's
//! first trouble report, the last lines). Not part of CI: it exists to
//! find the rare hang a single CI run cannot.
use crate::{artifacts, root};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use thinhv_ovmf::esp::{self, Esp};
use thinhv_ovmf::qemu::{self, Profile, Serial};
use thinhv_ovmf::runner::Run;
use thinhv_ovmf::{firmware, linux};

/// A Linux boot with SMP 4 under TCG takes 25–40 s to userspace on the
/// project's machines; the test script runs a minute more.
const TIMEOUT: Duration = Duration::from_mins(7);

/// Whether one boot reached `THINHV-TEST-END`; `Err` carries the report.
fn boot_once(a: &artifacts::Artifacts, img: &linux::LinuxImage, n: usize) -> Result<f64, String> {
    let dir = root().join("build").join("soak");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let esp_dir = dir.join(format!("esp-{n}"));
    let _ = std::fs::remove_dir_all(&esp_dir);
    let esp = Esp::create(&esp_dir).map_err(|e| e.to_string())?;
    esp.install_linux(img).map_err(|e| e.to_string())?;
    let options = esp::kernel_options("quiet thinhv_test=1");
    let config = esp::config_booting(esp::KERNEL, Some(&options), "");
    esp.install_thinhv(&a.efi, Some(&config))
        .map_err(|e| e.to_string())?;
    let disk = dir.join("soak-nvme.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(|e| e.to_string())?;
    let ovmf = firmware::find()?;
    let vars = esp_dir.with_extension("vars.fd");
    std::fs::copy(&ovmf.vars, &vars).map_err(|e| e.to_string())?;
    let serial = esp_dir.with_extension("serial.txt");
    let mut p = Profile::svm(4);
    p.extra = qemu::IGB_BEHIND_ROOT_PORT.map(String::from).to_vec();
    p.extra.extend([
        "-drive".to_string(),
        format!("file={},if=none,id=soak0,format=raw", disk.display()),
        "-device".into(),
        "nvme,serial=soak0,drive=soak0".into(),
    ]);
    let cmd = qemu::command(&ovmf, &vars, &esp_dir, &p, &Serial::File(serial.clone()));
    let mut run = Run::start(cmd, &serial).map_err(|e| e.to_string())?;
    match run.wait_for("THINHV-TEST-END", TIMEOUT) {
        Ok(t) => {
            let out = run.output();
            let _ = run.wait_exit(Duration::from_secs(20));
            if !out.contains("processors virtualized") {
                return Err(format!("thinhv did not start:\n{out}"));
            }
            Ok(t.as_secs_f64())
        }
        Err(e) => Err(format!(
            "{e}\n{}",
            run.hang_report().brief(&format!("soak-{n}"))
        )),
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let n: usize = match args {
        [] => 10,
        [v] => v
            .parse()
            .map_err(|_| format!("soak: {v:?} is not a count"))?,
        _ => return Err("usage: cargo xtask soak [N]".into()),
    };
    crate::deps::ensure()?;
    let a = artifacts::build()?;
    let img = linux::prepare(&root().join("build/cache"), &a.tool)?;
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut times = Vec::new();
    for i in 0..n {
        match boot_once(&a, &img, i) {
            Ok(s) => {
                println!("soak {}/{n}: ok, THINHV-TEST-END after {s:.1} s", i + 1);
                times.push(s);
            }
            Err(e) => {
                println!("soak {}/{n}: FAILED\n{e}", i + 1);
                failures.push((i + 1, e));
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let mut summary = format!(
        "soak: {} of {n} boots reached THINHV-TEST-END in {:.0} s",
        times.len(),
        start.elapsed().as_secs_f64()
    );
    if let (Some(lo), Some(hi)) = (times.first(), times.last()) {
        let _ = write!(
            summary,
            " (fastest {lo:.1} s, median {:.1} s, slowest {hi:.1} s)",
            times[times.len() / 2]
        );
    }
    println!("{summary}");
    if failures.is_empty() {
        Ok(())
    } else {
        let which: Vec<String> = failures.iter().map(|(i, _)| i.to_string()).collect();
        Err(format!(
            "{} boot(s) failed: {} (reports above; serial logs in build/soak/)",
            failures.len(),
            which.join(", ")
        ))
    }
}
