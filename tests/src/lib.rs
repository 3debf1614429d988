//! Harness for the integration tests.
//!
//! The tests boot OVMF + QEMU with artifacts `cargo xtask build` made (in
//! `THINHV_BUILD_DIR`, default `build/`). They are `#[ignore]`d so that a
//! plain `cargo test` reports them as not run rather than passing them;
//! `cargo xtask test` runs them with `--ignored`. Every boot has a timeout
//! and passes only on an explicit end marker and checked values.
use std::path::{Path, PathBuf};
use std::time::Duration;
use thinhv_ovmf::esp::{self, Esp};
use thinhv_ovmf::firmware;
use thinhv_ovmf::linux::LinuxImage;
use thinhv_ovmf::qemu::{self, Profile, Serial};
use thinhv_ovmf::runner::{Run, section, value};

pub use thinhv_ovmf::esp::{KERNEL, PROBE};

/// Where the build put things.
#[derive(Clone, Debug)]
pub struct Built {
    /// `thinhv.efi`.
    pub efi: PathBuf,
    /// The probe.
    pub probe: PathBuf,
    /// Kernel + initramfs.
    pub linux: LinuxImage,
    /// Scratch space for this test run.
    pub work: PathBuf,
}

/// Records that a test could not check what it is for because the test bed
/// lacks a capability: `cargo xtask it` lists these as SKIPPED at the end
/// (the test itself returns, so the harness counts it as run).
pub fn skipped(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}\n");
    eprint!("{line}");
    record(thinhv_ovmf::SKIPPED_FILE, &line);
}

/// Appends `text` to `file` in the work directory, for xtask to print after
/// the run.
fn record(file: &str, text: &str) {
    use std::io::Write;
    let b = built();
    let _ = std::fs::create_dir_all(&b.work);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(b.work.join(file))
    {
        let _ = f.write_all(text.as_bytes());
    }
}

/// The build directory's artifacts; panics with instructions when absent.
pub fn built() -> Built {
    let dir = thinhv_ovmf::build_dir();
    let need = |p: PathBuf| {
        assert!(
            p.exists(),
            "{} is missing: run the integration tests through `cargo xtask test`",
            p.display()
        );
        p
    };
    Built {
        efi: need(dir.join("thinhv.efi")),
        probe: need(dir.join("thinhv-probe.efi")),
        linux: LinuxImage {
            kernel: find_kernel(&dir.join("cache/linux/boot")),
            initrd: need(dir.join("cache/initrd.img")),
        },
        work: dir.join("it"),
    }
}

fn find_kernel(boot: &Path) -> PathBuf {
    std::fs::read_dir(boot)
        .ok()
        .and_then(|d| {
            d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no kernel in {}: run through `cargo xtask test`",
                boot.display()
            )
        })
}

/// One boot of the emulator.
pub struct Boot {
    /// Test name (directory under `work`).
    pub name: String,
    /// Machine.
    pub profile: Profile,
    /// The ESP directory.
    pub esp: Esp,
    serial: PathBuf,
    vars: PathBuf,
}

/// Where the firmware finds the probe when it boots first (removable-media
/// path), and where the probe then finds thinhv.
const REMOVABLE_LOADER: &str = r"\EFI\BOOT\BOOTX64.EFI";
const THINHV_AFTER_PROBE: &str = r"\EFI\thinhv\thinhv.efi";

impl Boot {
    /// The EFI probe alone, as the boot loader: no thinhv on the disk (the
    /// bare control of a probe test).
    pub fn install_probe_bare(&self, b: &Built) {
        self.esp
            .put_file(REMOVABLE_LOADER, &b.probe)
            .expect("install the probe");
    }

    /// The probe boots first, natively (it may prepare the machine: arm a
    /// device, split the memory map, disable a processor — `marker`, a
    /// file under `\EFI\thinhv\` that tells it what), then starts thinhv
    /// with `config`, which starts the probe again under it.
    pub fn install_probe_first(&self, b: &Built, config: &str, marker: Option<&str>) {
        self.install_probe_bare(b);
        self.esp
            .put_file(PROBE, &b.probe)
            .expect("install the probe");
        self.esp
            .put_file(THINHV_AFTER_PROBE, &b.efi)
            .expect("install thinhv");
        self.esp
            .put_bytes(r"\EFI\thinhv\thinhv.toml", config.as_bytes())
            .expect("write thinhv.toml");
        if let Some(m) = marker {
            self.esp
                .put_bytes(&format!(r"\EFI\thinhv\{m}"), b"1\n")
                .expect("write the probe's marker");
        }
    }

    /// A fresh ESP for test `name`.
    pub fn new(b: &Built, name: &str, profile: Profile) -> Self {
        let dir = b.work.join(name);
        let esp = Esp::create(&dir.join("esp")).expect("create ESP");
        Self {
            name: name.into(),
            profile,
            esp,
            serial: dir.join("serial.txt"),
            vars: dir.join("vars.fd"),
        }
    }

    /// Starts QEMU.
    pub fn start(&self) -> Run {
        let ovmf = firmware::find().expect("OVMF");
        std::fs::copy(&ovmf.vars, &self.vars).expect("copy OVMF variables");
        let cmd = qemu::command(
            &ovmf,
            &self.vars,
            self.esp.root(),
            &self.profile,
            &Serial::File(self.serial.clone()),
        );
        eprintln!("[{}] starting QEMU: {cmd:?}", self.name);
        Run::start(cmd, &self.serial).expect("start QEMU")
    }

    /// Boots and waits for `end`; returns the serial output. Panics (with
    /// the output) on timeout or early exit.
    pub fn run_until(&self, end: &str, timeout: Duration) -> String {
        self.run_until_nth(end, 1, timeout)
    }

    /// As [`Self::run_until`], until `end` has appeared `n` times (a
    /// machine that resets and boots again); QEMU is ended then.
    pub fn run_until_nth(&self, end: &str, n: usize, timeout: Duration) -> String {
        let mut run = self.start();
        let deadline = std::time::Instant::now() + timeout;
        let mut waited = run.wait_for(end, timeout);
        while waited.is_ok() && run.output().matches(end).count() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            std::thread::sleep(Duration::from_millis(200));
            waited = if left.is_zero() {
                Err(thinhv_ovmf::runner::WaitError::Timeout {
                    marker: format!("{end} (x{n})"),
                    after: timeout,
                })
            } else {
                run.wait_for(end, left)
            };
        }
        match waited {
            Ok(t) => {
                eprintln!("[{}] {end:?} after {:.1} s", self.name, t.as_secs_f64());
                let out = run.output();
                // Let a powering-off guest finish, but never wait long.
                let _ = run.wait_exit(Duration::from_secs(20));
                out
            }
            Err(e) => {
                let hang = run.hang_report();
                if matches!(e, thinhv_ovmf::runner::WaitError::Timeout { .. }) {
                    record(thinhv_ovmf::HANGS_FILE, &hang.brief(&self.name));
                }
                panic!(
                    "[{}] {e}\n----- serial -----\n{}\n----- qemu -----\n{}\n{}[{}] {e}",
                    self.name,
                    run.output(),
                    run.qemu_messages(),
                    hang.full(),
                    self.name,
                )
            }
        }
    }
}

/// Linux's command line for test runs.
pub fn test_options() -> String {
    esp::kernel_options("quiet thinhv_test=1")
}

/// A configuration booting Linux in test mode, plus `extra` TOML.
pub fn linux_config(extra: &str) -> String {
    esp::config_booting(KERNEL, Some(&test_options()), extra)
}

/// The facts the guest reporter printed.
#[derive(Debug)]
pub struct Guest {
    /// The whole serial log.
    pub serial: String,
    /// `THINHV-TEST-BEGIN`..`END`.
    pub facts: String,
    /// `thinhv status --json`, if thinhv was present.
    pub status: Option<serde_json::Value>,
    /// `thinhv selftest` output.
    pub selftest: String,
    /// `thinhv devices --json`, if thinhv was present.
    pub devices: Option<serde_json::Value>,
    /// `thinhv log --json`, if thinhv was present.
    pub log: Option<serde_json::Value>,
}

impl Guest {
    /// A value the reporter printed.
    pub fn get(&self, key: &str) -> &str {
        value(&self.facts, key)
            .unwrap_or_else(|| panic!("guest did not report {key}:\n{}", self.facts))
    }

    /// A value `thinhv selftest` printed.
    pub fn selftest(&self, key: &str) -> &str {
        value(&self.selftest, key)
            .unwrap_or_else(|| panic!("selftest did not report {key}:\n{}", self.selftest))
    }
}

/// A QEMU `-drive` value for a new sparse raw disk of `bytes` in the
/// build's work directory (`name`), with drive id `id`.
pub fn raw_drive(name: &str, id: &str, bytes: u64) -> String {
    format!("file={},if=none,id={id},format=raw", raw_image(name, bytes))
}

/// A sparse raw image of `bytes` named `name` in the work directory
/// (created anew); its path.
pub fn raw_image(name: &str, bytes: u64) -> String {
    let work = &built().work;
    // The first test of a fresh checkout may be the first to use it.
    std::fs::create_dir_all(work).unwrap();
    let path = work.join(name);
    std::fs::File::create(&path)
        .and_then(|file| file.set_len(bytes))
        .unwrap();
    path.display().to_string()
}

/// Timeout for a Linux boot under TCG (SMP 4 takes longest).
pub const LINUX_TIMEOUT: Duration = Duration::from_mins(7);

/// Boots Linux in test mode and collects the reporter's output.
pub fn boot_linux(boot: &Boot) -> Guest {
    boot_linux_within(boot, LINUX_TIMEOUT)
}

/// As [`boot_linux`], for a test whose reporter takes longer than a boot
/// (`timeout` from QEMU's start to its end marker).
pub fn boot_linux_within(boot: &Boot, timeout: Duration) -> Guest {
    let serial = boot.run_until("THINHV-TEST-END", timeout);
    let facts = section(&serial, "THINHV-TEST-BEGIN", "THINHV-TEST-END")
        .expect("test section")
        .to_string();
    let status = section(&facts, "THINHV-STATUS-JSON-BEGIN", "THINHV-STATUS-JSON-END")
        .and_then(|j| serde_json::from_str(j.trim()).ok());
    let selftest = section(&facts, "THINHV-SELFTEST-BEGIN", "THINHV-SELFTEST-END")
        .unwrap_or("")
        .to_string();
    let json = |begin: &str, end: &str| {
        section(&facts, begin, end).and_then(|j| serde_json::from_str(j.trim()).ok())
    };
    let devices = json("THINHV-DEVICES-JSON-BEGIN", "THINHV-DEVICES-JSON-END");
    let log = json("THINHV-LOG-JSON-BEGIN", "THINHV-LOG-JSON-END");
    Guest {
        serial,
        facts,
        status,
        selftest,
        devices,
        log,
    }
}

/// Boots Linux in test mode under thinhv on `profile`, the IOMMU
/// protecting (`[iommu] mode = "protect"`), with `options` added to the
/// kernel's test command line and `extra_config` (TOML tables) to
/// `thinhv.toml`; collects the reporter's output.
pub fn boot_linux_under_thinhv(
    name: &str,
    profile: Profile,
    options: &str,
    extra_config: &str,
) -> Guest {
    boot_linux(&linux_under_thinhv(name, profile, options, extra_config))
}

/// The machine [`boot_linux_under_thinhv`] boots, not started yet.
pub fn linux_under_thinhv(name: &str, profile: Profile, options: &str, extra_config: &str) -> Boot {
    linux_under_thinhv_iommu(name, profile, options, extra_config, "mode = \"protect\"")
}

/// As [`linux_under_thinhv`], with `iommu` as the `[iommu]` section's
/// lines.
pub fn linux_under_thinhv_iommu(
    name: &str,
    profile: Profile,
    options: &str,
    extra_config: &str,
    iommu: &str,
) -> Boot {
    let b = built();
    let boot = Boot::new(&b, name, profile);
    boot.esp.install_linux(&b.linux).expect("install Linux");
    let config = esp::config_booting(
        KERNEL,
        Some(&esp::kernel_options(&format!(
            "quiet thinhv_test=1 {options}"
        ))),
        &format!("\n[iommu]\n{iommu}\n{extra_config}"),
    );
    boot.esp
        .install_thinhv(&b.efi, Some(&config))
        .expect("install thinhv");
    boot
}

/// The `attack NAME: attempts=N succeeded=M` lines the guest tool
/// printed, in order: (name, attempts, succeeded).
pub fn attack_results(facts: &str) -> Vec<(String, u64, u64)> {
    attack_lines(facts)
        .filter_map(|(name, fields)| {
            let number = |k: &str| field(fields, k)?.parse::<u64>().ok();
            Some((name.to_string(), number("attempts")?, number("succeeded")?))
        })
        .collect()
}

/// The value of `key=` on the first `attack NAME: ...` line for `name`.
pub fn attack_field(facts: &str, name: &str, key: &str) -> Option<String> {
    attack_lines(facts)
        .find(|(n, _)| *n == name)
        .and_then(|(_, fields)| field(fields, key))
        .map(str::to_string)
}

/// (name, the rest) of each `attack NAME: k=v ...` line.
fn attack_lines(facts: &str) -> impl Iterator<Item = (&str, &str)> {
    facts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("attack ")?.split_once(": "))
}

/// The value of `key=` among whitespace-separated fields.
fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    fields
        .split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

/// Runs the probe: the whole serial output and the probe's report.
pub fn run_probe(boot: &Boot) -> (String, String) {
    let serial = boot.run_until("THINHV-PROBE-END", Duration::from_mins(4));
    let report = section(&serial, "THINHV-PROBE-BEGIN", "THINHV-PROBE-END")
        .unwrap_or_else(|| panic!("no probe report:\n{serial}"))
        .to_string();
    (serial, report)
}

/// Runs the probe and returns its report.
pub fn boot_probe(boot: &Boot) -> String {
    run_probe(boot).1
}

/// A value the probe reported (the test fails, showing the report, when
/// it is missing).
pub fn probe_value<'a>(report: &'a str, key: &str) -> &'a str {
    value(report, key).unwrap_or_else(|| panic!("probe did not report {key}:\n{report}"))
}

/// Checks the EFI probe's report against the CPU profile `name` (resolved
/// by the same code the loader uses): every governed register shows only
/// bits the profile allows, AVX and AVX2 are absent, CPUID 0xD agrees with
/// x87|SSE only, and XSETBV refuses the AVX state while accepting x87|SSE.
/// `native` is the same probe's report without a profile, which must have
/// shown AVX2 and accepted the AVX state, or this check would prove nothing.
pub fn assert_probe_follows_profile(r: &str, native: Option<&str>, name: &str) {
    use thinhv_config::profile::{EAX, EBX, ECX, EDX, resolve};
    let p = resolve(name, &[], &[]).unwrap();
    let hex = |key: &str| -> u32 {
        let v = value(r, key).unwrap_or_else(|| {
            panic!(
                "probe did not report {key}:
{r}"
            )
        });
        u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    };
    for (key, leaf, sub, reg) in [
        ("cpuid1_ecx", 1, 0, ECX),
        ("cpuid1_edx", 1, 0, EDX),
        ("cpuid7_ebx", 7, 0, EBX),
        ("cpuid7_ecx", 7, 0, ECX),
        ("cpuid7_edx", 7, 0, EDX),
        ("cpuid7_1_eax", 7, 1, EAX),
        ("xsave_d1_eax", 0xd, 1, EAX),
        ("ext1_ecx", 0x8000_0001, 0, ECX),
        ("ext1_edx", 0x8000_0001, 0, EDX),
    ] {
        let allowed = p.apply(leaf, sub, [u32::MAX; 4])[reg];
        let seen = hex(key);
        assert_eq!(
            seen & !allowed,
            0,
            "{key} = {seen:#x} shows bits {:#x} that profile {name} hides",
            seen & !allowed
        );
    }
    assert_eq!(hex("cpuid7_ebx") & (1 << 5), 0, "AVX2 visible");
    assert_eq!(hex("cpuid1_ecx") & (1 << 28), 0, "AVX visible");
    let get = |k: &str| {
        value(r, k).unwrap_or_else(|| {
            panic!(
                "probe did not report {k}:
{r}"
            )
        })
    };
    assert_eq!(get("xsave_xcr0_supported"), "0x3");
    assert_eq!(get("xsave_max_size"), "576", "x87 + SSE + header");
    assert_eq!(get("xsave_avx_leaf_eax"), "0", "AVX component hidden");
    assert_eq!(get("xsetbv_fault"), "0", "x87|SSE must be accepted");
    assert_eq!(get("xcr0_after_xsetbv"), "3");
    assert_eq!(get("xsetbv_avx_fault"), "13", "XCR0.AVX must raise #GP");
    assert_eq!(get("xsetbv_restore_fault"), "0");
    if let Some(n) = native {
        let v = value(n, "cpuid7_ebx").expect("native cpuid7_ebx");
        let ebx = u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
        assert_ne!(
            ebx & (1 << 5),
            0,
            "the processor must have AVX2 for this test"
        );
        assert_eq!(value(n, "xsetbv_avx_fault"), Some("0"));
    }
}

/// `0-3` → 4.
pub fn cpu_list_len(list: &str) -> usize {
    list.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => usize::from(!part.is_empty()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::cpu_list_len;

    #[test]
    fn attack_lines() {
        let facts = "x=1\ncf8-race: detail\nattack cf8-race: attempts=120 succeeded=0\n\
                     attack cfc-overlap: attempts=0 succeeded=0 error=no I/O privilege\n";
        assert_eq!(
            super::attack_results(facts),
            [
                ("cf8-race".to_string(), 120, 0),
                ("cfc-overlap".to_string(), 0, 0)
            ]
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list_len("0-3"), 4);
        assert_eq!(cpu_list_len("0"), 1);
        assert_eq!(cpu_list_len("0,2-3"), 3);
    }
}
