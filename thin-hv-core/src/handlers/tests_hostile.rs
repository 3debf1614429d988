//! What a hostile guest kernel tries, on the fakes: INIT and SIPI to CPUs
//! thinhv does not run (before and after the seal, every destination
//! form), and hypercall buffers in holes of the memory map.
use super::fake::*;
use super::*;
use crate::guest::Gpr;
use crate::guest_mem::ram_covers;
use crate::hv::Hv;
use core::sync::atomic::Ordering;
use std::sync::Mutex;
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{CpuInfo, Handoff};
use thinhv_abi::hypercall::{Function, Status};
use thinhv_abi::status::CpuState;

const RIP: u64 = 0x10_0000;
/// `mov dword [rdx+0x300], eax`
const MOV_ICR: &[u8] = &[0x89, 0x82, 0x00, 0x03, 0x00, 0x00];
const VMMCALL: &[u8] = &[0x0f, 0x01, 0xd9];

const INIT_ASSERT: u32 = 0xc500;
const INIT_DEASSERT: u32 = 0x8500;
const SIPI_99: u32 = 0x0699;

fn at(env: &mut FakeEnv, code: &[u8]) -> FakeCpu {
    env.put(RIP, code);
    FakeCpu {
        rip: RIP,
        ..Default::default()
    }
}

fn npf_write(gpa: u64) -> Exit {
    Exit::NestedFault {
        gpa,
        write: true,
        fetch: false,
        present: true,
        guest_table_walk: false,
    }
}

/// The guest writes ICR high, then ICR low through the xAPIC page.
fn icr(env: &mut FakeEnv, high: u32, low: u32) -> Outcome {
    env.apic.insert(0x310, high);
    let mut cpu = at(env, MOV_ICR);
    cpu.regs[Gpr::Rax as usize] = u64::from(low);
    let h = handle(&npf_write(APIC + 0x300), &mut cpu, env);
    assert_eq!(cpu.rip, RIP + 6, "the write is completed");
    h.outcome
}

fn seal(env: &FakeEnv) {
    env.hv.sealed.store(true, Ordering::SeqCst);
}

fn refused(env: &FakeEnv) -> u64 {
    env.hv.refused_ipis.load(Ordering::SeqCst)
}

/// INIT or STARTUP IPIs that reached the hardware ICR, as (destination,
/// delivery mode, shorthand), xAPIC and x2APIC alike.
fn real_init_sipi(env: &FakeEnv) -> Vec<(u32, u32, u32)> {
    let mut out: Vec<(u32, u32, u32)> = env
        .apic_writes
        .iter()
        .enumerate()
        .filter(|(_, w)| w.0 == 0x300 && matches!((w.1 >> 8) & 7, 5 | 6))
        .map(|(i, w)| {
            let high = env.apic_writes[..i]
                .iter()
                .rev()
                .find(|p| p.0 == 0x310)
                .map_or(0, |p| p.1);
            (high >> 24, (w.1 >> 8) & 7, (w.1 >> 18) & 3)
        })
        .collect();
    out.extend(
        env.x2apic_writes
            .iter()
            .filter(|v| matches!((*v >> 8) & 7, 5 | 6))
            .map(|v| {
                (
                    (v >> 32) as u32,
                    ((v >> 8) & 7) as u32,
                    ((v >> 18) & 3) as u32,
                )
            }),
    );
    out
}

// ---- Log capture: refusals must be logged, and sparingly ----------------

struct Capture;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CAPTURE: Capture = Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        LINES.lock().unwrap().push(format!("{}", r.args()));
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once per test process) and returns the
/// lines logged so far that contain `needle`.
fn logged(needle: &str) -> Vec<String> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in the handler tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

// ---- INIT and SIPI to CPUs thinhv does not run ---------------------------

#[test]
fn before_the_seal_the_firmware_starts_aps_with_real_init_sipi() {
    // The loader virtualizes the BSP first, then the firmware's MP services
    // start every AP with INIT-SIPI-SIPI: those must reach the hardware.
    let mut env = FakeEnv::new();
    env.hv.cpus()[3].set_state(CpuState::OFFLINE); // not virtualized yet
    for (dest, low) in [
        (3, INIT_ASSERT),
        (3, SIPI_99),
        (9, INIT_ASSERT), // an APIC ID thinhv does not know
        (9, SIPI_99),
    ] {
        assert_eq!(icr(&mut env, dest << 24, low), Outcome::Resume);
    }
    assert_eq!(
        real_init_sipi(&env),
        vec![(3, 5, 0), (3, 6, 0), (9, 5, 0), (9, 6, 0)],
        "physical, one CPU each"
    );
    assert_eq!(refused(&env), 0);
    assert!(env.nmis_sent.is_empty());
}

#[test]
fn after_the_seal_init_sipi_to_cpus_not_under_thinhv_are_refused() {
    let mut env = FakeEnv::new();
    env.hv.cpus()[3].set_state(CpuState::OFFLINE); // e.g. failed to virtualize
    seal(&env);
    let before = logged("refused").len();
    // A known CPU that is not virtualized, an unknown (firmware-disabled)
    // ID, and the highest xAPIC ID short of broadcast.
    for dest in [3, 9, 0xfe] {
        for low in [INIT_ASSERT, 0x4500, SIPI_99, 0x0610] {
            assert_eq!(icr(&mut env, dest << 24, low), Outcome::Resume);
        }
        // The de-assert is a no-op everywhere: neither sent nor counted.
        icr(&mut env, dest << 24, INIT_DEASSERT);
    }
    assert_eq!(real_init_sipi(&env), vec![], "nothing reached the APIC");
    assert_eq!(refused(&env), 12);
    assert!(env.nmis_sent.is_empty());
    let lines = logged("refused");
    assert!(
        lines.len() > before
            && lines.iter().any(|l| l.contains("INIT to APIC 0x9 refused"))
            && lines
                .iter()
                .any(|l| l.contains("STARTUP to APIC 0x3 refused")),
        "{lines:?}"
    );
    // The guest's ICR high is left as it wrote it.
    assert_eq!(env.apic[&0x310], 0xfe << 24);
    // thinhv's own CPUs still take INIT and SIPI (virtually).
    icr(&mut env, 2 << 24, INIT_ASSERT);
    icr(&mut env, 2 << 24, SIPI_99);
    assert_eq!(env.nmis_sent, vec![2]);
    let slot = &env.hv.cpus()[2];
    assert!(slot.mailbox.take_init());
    assert_eq!(slot.mailbox.take_sipi(), Some(0x99));
    // Other delivery modes are not INIT/SIPI: forwarded as before.
    env.apic_writes.clear();
    icr(&mut env, 9 << 24, 0x40fd);
    assert_eq!(env.apic_writes, vec![(0x310, 9 << 24), (0x300, 0x40fd)]);
    assert_eq!(refused(&env), 12);
}

#[test]
fn after_the_seal_x2apic_init_sipi_to_unknown_ids_are_refused() {
    let mut env = FakeEnv::new();
    for v in [(0x1234u64 << 32) | 0x4500, (0x1234u64 << 32) | 0x0610] {
        assert_eq!(icr_write(&mut env, v, true), Outcome::Resume);
    }
    assert_eq!(
        real_init_sipi(&env),
        vec![(0x1234, 5, 0), (0x1234, 6, 0)],
        "before the seal: forwarded"
    );
    env.x2apic_writes.clear();
    seal(&env);
    for v in [(0x1234u64 << 32) | 0x4500, (0x1234u64 << 32) | 0x0610] {
        assert_eq!(icr_write(&mut env, v, true), Outcome::Resume);
    }
    assert!(env.x2apic_writes.is_empty(), "{:x?}", env.x2apic_writes);
    assert_eq!(refused(&env), 2);
    // A known, virtualized CPU: virtual as always.
    icr_write(&mut env, (3u64 << 32) | 0x4500, true);
    assert_eq!(env.nmis_sent, vec![3]);
    assert!(env.x2apic_writes.is_empty());
}

#[test]
fn broadcasts_reach_only_the_cpus_under_thinhv() {
    let mut env = FakeEnv::new();
    env.hv.cpus()[3].set_state(CpuState::OFFLINE);
    seal(&env);
    // Shorthand "all excluding self": CPUs 1 and 2 virtually, 3 refused,
    // and no broadcast ever reaches the APIC (it would start CPUs thinhv
    // does not know).
    assert_eq!(icr(&mut env, 0, 0x000c_0000 | INIT_ASSERT), Outcome::Resume);
    assert_eq!(env.nmis_sent, vec![1, 2]);
    assert_eq!(refused(&env), 1);
    // "All including self" and the physical broadcast IDs: this CPU too.
    assert_eq!(
        icr(&mut env, 0, 0x0008_0000 | INIT_ASSERT),
        Outcome::WaitForSipi
    );
    assert_eq!(icr(&mut env, 0xff << 24, INIT_ASSERT), Outcome::WaitForSipi);
    assert_eq!(
        icr_write(&mut env, (u64::from(u32::MAX) << 32) | 0x4500, true),
        Outcome::WaitForSipi
    );
    icr(&mut env, 0, 0x000c_0000 | SIPI_99);
    assert_eq!(refused(&env), 5, "CPU 3 once per broadcast");
    assert_eq!(real_init_sipi(&env), vec![]);
    assert_eq!(env.hv.cpus()[1].mailbox.take_sipi(), Some(0x99));

    // The same broadcasts before the seal: CPU 3 gets a real, physical
    // INIT (the firmware starting it); still never a shorthand.
    let mut env = FakeEnv::new();
    env.hv.cpus()[3].set_state(CpuState::OFFLINE);
    icr(&mut env, 0, 0x000c_0000 | INIT_ASSERT);
    assert_eq!(real_init_sipi(&env), vec![(3, 5, 0)]);
}

#[test]
fn logical_init_sipi_never_reach_the_hardware() {
    let mut env = FakeEnv::new();
    // Flat logical, destination bit 1 — before the seal too.
    icr(&mut env, 0x02 << 24, 0x0800 | INIT_ASSERT);
    seal(&env);
    icr(&mut env, 0xff << 24, 0x0800 | INIT_ASSERT);
    icr(&mut env, 0x0f << 24, 0x0800 | SIPI_99);
    icr_write(&mut env, (0x0001_000fu64 << 32) | 0x0d00, true);
    assert_eq!(real_init_sipi(&env), vec![]);
    assert!(env.nmis_sent.is_empty());
    assert_eq!(refused(&env), 4);
}

#[test]
fn a_flood_of_refused_inits_is_counted_but_logged_sparingly() {
    let mut env = FakeEnv::new();
    seal(&env);
    let needle = "INIT to APIC 0x77 refused";
    assert!(logged(needle).is_empty());
    for _ in 0..5000 {
        icr_write(&mut env, (0x77u64 << 32) | 0x4500, true);
    }
    assert_eq!(refused(&env), 5000);
    assert!(env.x2apic_writes.is_empty());
    let lines = logged(needle);
    // The first eight, then each 1024th (1024, 2048, 3072, 4096).
    assert_eq!(lines.len(), 12, "{lines:?}");
    assert!(lines[11].contains("(4096 refused so far)"), "{}", lines[11]);
}

// ---- Hypercall buffers in holes of the memory map ------------------------

/// The fake environment with these RAM ranges.
fn env_with_ram(ram: &[PhysRange]) -> FakeEnv {
    let mut h = Handoff::new();
    h.protected = PROTECTED;
    h.status = STATUS;
    h.cpu_count = 4;
    for i in 0..4 {
        h.cpus[i] = CpuInfo {
            apic_id: i as u32,
            flags: u32::from(i == 0),
        };
    }
    h.ram[..ram.len()].copy_from_slice(ram);
    h.ram_count = ram.len() as u32;
    h.phys_addr_bits = 40;
    h.vendor = 1;
    let mut env = FakeEnv::new();
    env.hv = Hv::from_handoff(&h, APIC);
    for c in env.hv.cpus() {
        c.set_state(CpuState::RUNNING);
    }
    env
}

fn hypercall(env: &mut FakeEnv, f: Function, a: [u64; 3]) -> Status {
    let mut cpu = at(env, VMMCALL);
    cpu.regs[Gpr::Rax as usize] = f.0;
    cpu.regs[Gpr::Rbx as usize] = a[0];
    cpu.regs[Gpr::Rcx as usize] = a[1];
    cpu.regs[Gpr::Rdx as usize] = a[2];
    handle(&Exit::Hypercall, &mut cpu, env);
    assert_eq!(cpu.rip, RIP + 3);
    Status(cpu.regs[Gpr::Rax as usize])
}

/// A PC's memory map as the loader passes it: low memory below the VGA
/// window, RAM up to the hypervisor, RAM above 4 GiB.
const PC_RAM: [PhysRange; 3] = [
    PhysRange::new(0, 0xa_0000),
    PhysRange::new(0x10_0000, 0x7e00_0000 - 0x10_0000),
    PhysRange::new(0x1_0000_0000, 0x1_0000_0000),
];

#[test]
fn hypercall_buffers_in_device_memory_are_refused() {
    let mut env = env_with_ram(&PC_RAM);
    let cases = [
        ("legacy VGA window", 0xa_0000, 0x100),
        ("ECAM", 0xb000_0000, 0x100),
        ("HPET", 0xfed0_0000, 0x100),
        ("VT-d unit", 0xfed9_0000, 0x100),
        ("AMD-Vi unit", 0xfed8_0000, 0x100),
        ("local APIC", 0xfee0_0000, 0x400),
        ("above the top of RAM", 0x2_0000_0000, 0x100),
        // The calls write the report's size (0x60, 0x88 bytes), at most
        // the buffer: these straddle the edge by 0x30 bytes or more.
        ("from RAM into the VGA window", 0x9_ffd0, 0x100),
        ("from the 32-bit hole into RAM", 0xffff_ff80, 0x100),
        ("from the top of RAM beyond", 0x1_ffff_ffd0, 0x100),
    ];
    for (what, gpa, len) in cases {
        for f in [Function::STATUS, Function::LOG_READ, Function::EXIT_COUNTS] {
            env.put(RIP, VMMCALL);
            let before = env.mem.clone();
            let len = if f == Function::EXIT_COUNTS {
                0x1000
            } else {
                len
            };
            assert_eq!(
                hypercall(&mut env, f, [gpa, len, 0]),
                Status::BAD_ADDRESS,
                "{} into {what} ({gpa:#x})",
                f.name()
            );
            assert_eq!(env.mem, before, "{what}: nothing written");
        }
    }
    // RAM right at the edges is fine.
    assert_eq!(
        hypercall(&mut env, Function::STATUS, [0xa_0000 - 0x60, 0x60, 0]),
        Status::OK
    );
    assert_eq!(
        hypercall(&mut env, Function::LOG_READ, [0x1_0000_0000, 0x10, 0]),
        Status::OK
    );
}

#[test]
fn a_buffer_may_span_adjacent_ranges_but_never_a_gap() {
    let ram = [
        PhysRange::new(0x1000, 0x1000),
        PhysRange::new(0x2000, 0x1000),
        PhysRange::new(0x4000, 0x1000),
    ];
    let mut env = env_with_ram(&ram);
    assert_eq!(
        hypercall(&mut env, Function::LOG_READ, [0x1ff8, 0x10, 0]),
        Status::OK
    );
    assert_eq!(env.get(0x1ff8, 0x10), b"line one\nline tw");
    assert_eq!(
        hypercall(&mut env, Function::LOG_READ, [0x2ff8, 0x10, 0]),
        Status::BAD_ADDRESS,
        "0x3000..0x4000 is a hole"
    );
    assert_eq!(env.get(0x3000, 8), [0; 8]);
    // The rule itself, ranges in any order.
    let shuffled = [ram[2], ram[1], ram[0]];
    assert!(ram_covers(&shuffled, 0x1000, 0x2000));
    assert!(ram_covers(&shuffled, 0x1800, 0x1000));
    assert!(ram_covers(&shuffled, 0x4000, 0x1000));
    assert!(!ram_covers(&shuffled, 0x1000, 0x2001));
    assert!(!ram_covers(&shuffled, 0xfff, 0x10));
    assert!(!ram_covers(&shuffled, 0x4ff0, 0x11));
    assert!(!ram_covers(&shuffled, 0x1000, u64::MAX));
    assert!(!ram_covers(&[], 0x1000, 1));
    let top = [PhysRange::new(u64::MAX - 0xfff, 0x1000)];
    assert!(!ram_covers(&top, u64::MAX - 0xf, 0x10), "end wraps");
}
