//! `thinhv attack msr [CPU]`: the MSR attacks of the EFI probe, from a
//! running Linux kernel (issue 11). Root writes each MSR through the
//! kernel's `msr` driver (`/dev/cpu/CPU/msr`), so the kernel executes
//! WRMSR at CPL 0 exactly as a hostile kernel would; a #GP comes back as
//! EIO. Each write would change how the host itself runs (thinhv's MSR
//! policy, `docs/security.md`); a write that is taken is undone at once.
//!
//! Output: one line per MSR (`attack msr-NAME: taken|refused|unreadable`),
//! then `attack msr: attempts=N succeeded=M`; exit code 1 when the driver
//! is missing (so an attack that never ran cannot pass as succeeded=0).
//!
//! Not here, unlike the probe: relocating the local APIC (Linux, bare,
//! would lose interrupts between the write and its undo).
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

/// What an attack writes, from the current value.
type Change = fn(u64) -> u64;

/// (name, MSR, the change). AMD-only MSRs are absent on Intel, where the
/// read fails and the line says `unreadable`.
const ATTACKS: &[(&str, u32, Change)] = &[
    ("efer-reserved", 0xc000_0080, |v| v | 1 << 2),
    ("efer-svme", 0xc000_0080, |v| v | 1 << 12),
    ("pat-reserved", 0x277, |v| (v & !0xff) | 2),
    ("mtrr-deftype-reserved", 0x2ff, |v| (v & !0xff) | 2),
    ("hwcr-tlbcachedis", 0xc001_0015, |v| v | 1 << 3),
    ("syscfg-smee", 0xc001_0010, |v| v | 1 << 23),
    ("top-mem", 0xc001_001a, |v| v ^ 0x1000_0000),
    ("top-mem2", 0xc001_001d, |v| v.wrapping_add(0x1000_0000)),
    ("iorr-base0", 0xc001_0016, |_| 0x1000_0018),
    ("mmio-cfg-base", 0xc001_0058, |v| v ^ 0x1000_0000),
    ("nb-cfg", 0xc001_001f, |v| v ^ 1 << 46),
    ("vm-cr", 0xc001_0114, |v| v | 1 << 4),
];

/// `thinhv attack msr [CPU]`.
pub fn run(rest: &[String]) -> ExitCode {
    let cpu = rest.first().map_or("0", String::as_str);
    let path = format!("/dev/cpu/{cpu}/msr");
    let f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("thinhv attack msr: {path}: {e} (is the msr module loaded?)");
            println!("attack msr: attempts=0 succeeded=0 error={e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut attempts, mut taken) = (0u32, 0u32);
    for (name, msr, change) in ATTACKS {
        let mut b = [0u8; 8];
        if f.read_exact_at(&mut b, u64::from(*msr)).is_err() {
            println!("attack msr-{name}: unreadable");
            continue;
        }
        let current = u64::from_le_bytes(b);
        attempts += 1;
        let new = change(current);
        match f.write_all_at(&new.to_le_bytes(), u64::from(*msr)) {
            Ok(()) => {
                taken += 1;
                let _ = f.write_all_at(&current.to_le_bytes(), u64::from(*msr));
                println!("attack msr-{name}: taken ({current:#x} -> {new:#x})");
            }
            Err(e) => println!("attack msr-{name}: refused ({e})"),
        }
    }
    println!("attack msr: attempts={attempts} succeeded={taken}");
    ExitCode::SUCCESS
}
