//! `thinhv attack cf8-race BDF` and `thinhv attack cfc-overlap BDF`: what
//! a hostile kernel tries against thinhv's mediation of the legacy PCI
//! configuration ports (CONFIG_ADDRESS 0xCF8, CONFIG_DATA 0xCFC..0xCFF;
//! issue 11). A test tool for the guest, not for operators: root only.
//!
//! It runs in user space with I/O privilege (`iopl(3)`, else `ioperm`),
//! which executes the same IN and OUT instructions a kernel would and
//! meets the same intercepts. Each attack tries to read the Vendor/Device
//! ID of function `BDF` (segment 0), which it learns from thinhv's
//! inventory (a hidden function is absent from the OS's own view) or from
//! sysfs, and counts the reads that returned it:
//!
//! * `cf8-race`: two threads on two CPUs. One keeps moving the
//!   configuration address between another function's and `BDF`'s; the
//!   other selects `BDF` and reads CONFIG_DATA. With one address latch for
//!   the machine a check-then-access mediation can be raced: the check sees
//!   the other function's address, the access `BDF`'s.
//! * `cfc-overlap`: accesses that straddle the data window with `BDF`
//!   selected — a dword IN at 0xCFA and 0xCFB, a word IN at 0xCFB — and a
//!   dword OUT at 0xCFA that toggles the Interrupt Disable bit of the
//!   Command register, read back the same way (and restored).
//!
//! Against a function the OS owns both succeed (the control: the tool can
//! see a success); against a function thinhv hides none may.
//!
//! Output: detail lines, then `attack NAME: attempts=N succeeded=M`; exit
//! code 0, or 1 when the attack could not run at all (no I/O privilege, no
//! second CPU, an unknown function).
use crate::cpuid::presence;
use crate::report::read_page;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thinhv_passthrough::pci::Bdf;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
/// The Command register.
const COMMAND: u8 = 0x04;
/// Command: Interrupt Disable (harmless to toggle: it only masks INTx).
const INTX_DISABLE: u32 = 1 << 10;
/// How long the race runs, and at most how many reads it makes.
const RACE_TIME: Duration = Duration::from_secs(3);
const RACE_READS: u64 = 2_000_000;
/// Rounds of each overlapping access.
const OVERLAP_ROUNDS: u32 = 50;

/// `thinhv attack NAME BDF`.
pub fn run(rest: &[String]) -> ExitCode {
    let (Some(name), Some(bdf)) = (rest.first(), rest.get(1)) else {
        eprintln!("usage: thinhv attack cf8-race|cfc-overlap BDF");
        return ExitCode::from(2);
    };
    let Some(bdf) = Bdf::parse(bdf).filter(|b| b.segment == 0) else {
        eprintln!("thinhv attack: {bdf:?} is not a segment-0 PCI address (such as 00:07.0)");
        return ExitCode::from(2);
    };
    let result = match name.as_str() {
        "cf8-race" => cf8_race(bdf),
        "cfc-overlap" => cfc_overlap(bdf),
        other => {
            eprintln!("thinhv attack: unknown attack {other:?} (cf8-race, cfc-overlap)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok((attempts, succeeded)) => {
            println!("attack {name}: attempts={attempts} succeeded={succeeded}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thinhv attack {name}: {e}");
            println!("attack {name}: attempts=0 succeeded=0 error={e}");
            ExitCode::FAILURE
        }
    }
}

/// CONFIG_ADDRESS for register `offset` of `b` (configuration mechanism
/// #1, PCI Local Bus Specification 3.0 §3.2.2.3.2).
fn address(b: Bdf, offset: u8) -> u32 {
    (1 << 31)
        | (u32::from(b.bus) << 16)
        | (u32::from(b.device) << 11)
        | (u32::from(b.function) << 8)
        | u32::from(offset & 0xfc)
}

/// Vendor ID | Device ID << 16 of `b`: from thinhv's inventory, else from
/// sysfs.
fn expected_id(b: Bdf) -> Result<u32, String> {
    let p = presence();
    if p.is_thinhv()
        && let Ok(page) = read_page(&p)
        && let Some(d) = page
            .devices
            .iter()
            .find(|d| d.segment == 0 && d.bus == b.bus && d.devfn == b.devfn())
    {
        return Ok(u32::from(d.vendor) | (u32::from(d.device) << 16));
    }
    let dir = format!("/sys/bus/pci/devices/{b}");
    let hex = |f: &str| -> Option<u32> {
        let t = std::fs::read_to_string(format!("{dir}/{f}")).ok()?;
        u32::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok()
    };
    match (hex("vendor"), hex("device")) {
        (Some(v), Some(d)) => Ok(v | (d << 16)),
        _ => Err(format!(
            "{b} is neither in thinhv's inventory nor in sysfs: its ID is unknown"
        )),
    }
}

/// A segment-0 function the OS sees, other than `not`.
fn another_function(not: Bdf) -> Option<Bdf> {
    let mut all: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    all.sort();
    all.iter()
        .filter_map(|n| Bdf::parse(n))
        .find(|b| b.segment == 0 && *b != not)
}

/// I/O privilege for this thread.
fn io_privilege() -> Result<(), String> {
    // SAFETY: system calls that only change this thread's I/O permission.
    let ok = unsafe { libc::iopl(3) == 0 || libc::ioperm(0xcf8, 8, 1) == 0 };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "no I/O privilege (iopl/ioperm: {})",
            std::io::Error::last_os_error()
        ))
    }
}

/// Pins this thread to CPU `cpu`.
fn pin(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed `cpu_set_t` is a valid empty set; the calls only
    // read and write it, and set this thread's affinity.
    let r = unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot run on CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// OUT of a dword.
fn out32(port: u16, v: u32) {
    // SAFETY: the caller holds I/O privilege for the configuration ports;
    // an OUT touches no memory of this process.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags));
    }
}

/// IN of a dword.
fn in32(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as `out32`.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags));
    }
    v
}

/// IN of a word.
fn in16(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as `out32`.
    unsafe {
        core::arch::asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags));
    }
    v
}

fn cf8_race(target: Bdf) -> Result<(u64, u64), String> {
    let expected = expected_id(target)?;
    let other = another_function(target).ok_or("no other PCI function to race with")?;
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus < 2 {
        return Err(String::from("the race needs two online CPUs"));
    }
    println!(
        "cf8-race: target {target} id {expected:#010x}; the other thread selects {other} on another CPU"
    );
    let hidden_addr = address(target, 0);
    let other_addr = address(other, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let toggles = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (stop, toggles, ready) = (stop.clone(), toggles.clone(), ready.clone());
        std::thread::spawn(move || -> Result<(), String> {
            pin(1)?;
            io_privilege()?;
            ready.store(true, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                out32(CONFIG_ADDRESS, other_addr);
                out32(CONFIG_ADDRESS, hidden_addr);
                toggles.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let reader = move || -> Result<(u64, u64, u64, u32), String> {
        pin(0)?;
        io_privilege()?;
        while !ready.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let (mut attempts, mut hits, mut others) = (0u64, 0u64, 0u64);
        let mut first = 0;
        let end = Instant::now() + RACE_TIME;
        while attempts < RACE_READS && (attempts % 256 != 0 || Instant::now() < end) {
            out32(CONFIG_ADDRESS, hidden_addr);
            let v = in32(CONFIG_DATA);
            if attempts == 0 {
                first = v;
            }
            attempts += 1;
            if v == expected {
                hits += 1;
            } else if v != u32::MAX {
                others += 1;
            }
        }
        Ok((attempts, hits, others, first))
    };
    let read = reader();
    stop.store(true, Ordering::SeqCst);
    let toggled = toggler.join().map_err(|_| "the racing thread panicked")?;
    toggled?;
    let (attempts, hits, others, first) = read?;
    println!(
        "cf8-race: {attempts} reads of {target} (first {first:#010x}), {hits} returned its ID, \
         {others} another value; the other thread moved the address {} times",
        toggles.load(Ordering::Relaxed)
    );
    Ok((attempts, hits))
}

fn cfc_overlap(target: Bdf) -> Result<(u64, u64), String> {
    let expected = expected_id(target)?;
    pin(0)?;
    io_privilege()?;
    println!("cfc-overlap: target {target} id {expected:#010x}");
    let (mut attempts, mut succeeded) = (0u64, 0u64);
    let mut tally = |what: &str, round: u32, got: u32, hit: bool| {
        if round == 0 {
            println!(
                "cfc-overlap: {what} -> {got:#010x}{}",
                if hit { " (the function's)" } else { "" }
            );
        }
        attempts += 1;
        succeeded += u64::from(hit);
    };
    for round in 0..OVERLAP_ROUNDS {
        // IN EAX at 0xCFA: bytes 2-3 are CONFIG_DATA bytes 0-1, the
        // Vendor ID.
        out32(CONFIG_ADDRESS, address(target, 0));
        let v = in32(CONFIG_DATA - 2);
        tally("in32 0xcfa", round, v, v >> 16 == expected & 0xffff);
        // IN EAX at 0xCFB: bytes 1-3 are CONFIG_DATA bytes 0-2.
        out32(CONFIG_ADDRESS, address(target, 0));
        let v = in32(CONFIG_DATA - 1);
        tally("in32 0xcfb", round, v, v >> 8 == expected & 0x00ff_ffff);
        // IN AX at 0xCFB: byte 1 is CONFIG_DATA byte 0.
        out32(CONFIG_ADDRESS, address(target, 0));
        let v = u32::from(in16(CONFIG_DATA - 1));
        tally("in16 0xcfb", round, v, v >> 8 == expected & 0xff);
        // OUT EAX at 0xCFA into the Command register, read back the same
        // way; restored when it got through.
        out32(CONFIG_ADDRESS, address(target, COMMAND));
        let before = in32(CONFIG_DATA - 2);
        let command = before >> 16;
        let wanted = if command == 0xffff {
            INTX_DISABLE
        } else {
            command ^ INTX_DISABLE
        };
        out32(CONFIG_ADDRESS, address(target, COMMAND));
        out32(CONFIG_DATA - 2, (wanted << 16) | (before & 0xffff));
        out32(CONFIG_ADDRESS, address(target, COMMAND));
        let after = in32(CONFIG_DATA - 2) >> 16;
        let hit = after == wanted && after != command;
        if hit {
            out32(CONFIG_ADDRESS, address(target, COMMAND));
            out32(CONFIG_DATA - 2, (command << 16) | (before & 0xffff));
        }
        tally("out32 0xcfa (Command)", round, after, hit);
    }
    Ok((attempts, succeeded))
}
