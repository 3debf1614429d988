//! Partitions: IPIs stop at the border once an appliance has claimed its
//! processors; the claim itself; memory of another partition.
use super::fake::*;
use super::tests::{hypercall, icr, status};
use crate::env::Env;
use crate::partition::{PartitionId, PartitionState};
use core::sync::atomic::Ordering;
use thinhv_abi::hypercall::{Function, Status};

/// (destination, delivery mode, shorthand) of every ICR low write.
fn sent(env: &FakeEnv) -> Vec<(u32, u32, u32)> {
    env.apic_writes
        .windows(2)
        .filter(|w| w[1].0 == 0x300 && w[0].0 == 0x310)
        .map(|w| (w[0].1 >> 24, (w[1].1 >> 8) & 7, (w[1].1 >> 18) & 3))
        .collect()
}

fn claimed() -> FakeEnv {
    let mut env = FakeEnv::with_appliance();
    env.hv.sealed.store(true, Ordering::SeqCst);
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(status(&cpu), Status::OK);
    assert_eq!(cpu.regs[crate::guest::Gpr::Rbx as usize], 2);
    assert_eq!(env.remapping_starts, 1, "interrupt remapping started");
    // The parked CPUs took their INIT (the real ones do, on the wake-up).
    for i in [2, 3] {
        assert!(env.hv.cpus()[i].mailbox.take_init());
        env.hv.cpus()[i].set_state(thinhv_abi::status::CpuState::WAIT_FOR_SIPI);
        env.hv.cpus()[i].entered.store(true, Ordering::SeqCst);
    }
    env.apic_writes.clear();
    env.nmis_sent.clear();
    env
}

#[test]
fn the_claim_parks_the_appliance_cpus_once_and_only_after_the_seal() {
    let mut env = FakeEnv::with_appliance();
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::UNCLAIMED);
    assert_eq!(p.name(), "appl1");
    // Before the seal: refused (the loader's hook runs after it).
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
    env.hv.sealed.store(true, Ordering::SeqCst);
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(status(&cpu), Status::OK);
    assert_eq!(cpu.regs[crate::guest::Gpr::Rbx as usize], 2);
    // Each appliance CPU got a virtual INIT and its wake-up; no OS CPU did.
    assert_eq!(env.nmis_sent, [2, 3]);
    for i in [2, 3] {
        assert!(env.hv.cpus()[i].mailbox.take_init());
    }
    assert!(!env.hv.cpus()[1].mailbox.take_init());
    assert_eq!(
        env.hv.appliance(PartitionId(1)).unwrap().state(),
        PartitionState::STOPPED
    );
    // Again: nothing more to claim.
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(cpu.regs[crate::guest::Gpr::Rbx as usize], 0);
    assert_eq!(env.nmis_sent.len(), 2);
    // From an appliance CPU: refused.
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(status(&cpu), Status::OK);
    env.cpu = 2;
    env.hv.cpus()[2].entered.store(true, Ordering::SeqCst);
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
}

#[test]
fn before_the_claim_the_firmware_still_reaches_the_appliance_cpus() {
    // ExitBootServices: the firmware's INIT-SIPI-SIPI to all but self must
    // reach every processor it started, or it waits for ever.
    let mut env = FakeEnv::with_appliance();
    env.hv.sealed.store(true, Ordering::SeqCst);
    icr(&mut env, 0, 0x000c_4500);
    assert_eq!(env.nmis_sent, [1, 2, 3]);
    assert_eq!(env.hv.refused_ipis.load(Ordering::SeqCst), 0);
}

#[test]
fn init_and_sipi_from_the_os_never_reach_a_claimed_appliance() {
    let mut env = claimed();
    // Targeted INIT and SIPI.
    for target in [2u32, 3] {
        icr(&mut env, target << 24, 0xc500);
        icr(&mut env, target << 24, 0x0699);
    }
    // Broadcast INIT: all excluding self, all including self, physical 0xff.
    icr(&mut env, 0, 0x000c_4500);
    icr(&mut env, 0xff << 24, 0x4500);
    icr(&mut env, 0, 0x0008_4500);
    for i in [2, 3] {
        let slot = &env.hv.cpus()[i];
        assert!(!slot.mailbox.take_init(), "cpu {i}");
        assert_eq!(slot.mailbox.take_sipi(), None, "cpu {i}");
    }
    // The OS's own CPU 1 got the broadcasts (virtual INITs).
    assert_eq!(env.nmis_sent, [1, 1, 1]);
    assert_eq!(env.hv.refused_ipis.load(Ordering::SeqCst), 4);
    // Nothing INIT-like reached the APIC.
    assert!(
        sent(&env).iter().all(|&(_, mode, _)| mode < 5),
        "{:?}",
        sent(&env)
    );
}

#[test]
fn fixed_and_nmi_ipis_stay_in_the_partition() {
    let mut env = claimed();
    // Fixed IPI and NMI to an appliance CPU: dropped.
    icr(&mut env, 3 << 24, 0x40fd);
    icr(&mut env, 2 << 24, 0x4400);
    assert!(sent(&env).is_empty(), "{:?}", sent(&env));
    assert_eq!(env.hv.cross_partition_ipis.load(Ordering::SeqCst), 2);
    // To its own CPU 1: unchanged.
    icr(&mut env, 1 << 24, 0x40fd);
    assert_eq!(sent(&env), [(1, 0, 0)]);
    env.apic_writes.clear();
    // NMI to all excluding self: one physical NMI to CPU 1 only.
    icr(&mut env, 0, 0x000c_4400);
    assert_eq!(sent(&env), [(1, 4, 0)]);
    env.apic_writes.clear();
    // Fixed broadcast (physical 0xff) and all including self: CPUs 0 and 1.
    icr(&mut env, 0xff << 24, 0x40ef);
    assert_eq!(sent(&env), [(0, 0, 0), (1, 0, 0)]);
    env.apic_writes.clear();
    icr(&mut env, 0, 0x0008_40ef);
    assert_eq!(sent(&env), [(0, 0, 0), (1, 0, 0)]);
    // The guest's ICR high is left as it wrote it.
    assert_eq!(env.apic[&0x310], 0);
    // Self: unchanged, as are IPIs to APIC IDs thinhv does not know.
    env.apic_writes.clear();
    icr(&mut env, 0, 0x0004_40ef);
    icr(&mut env, 9 << 24, 0x40ef);
    assert_eq!(sent(&env), [(0, 0, 1), (9, 0, 0)]);
    assert_eq!(env.hv.cross_partition_ipis.load(Ordering::SeqCst), 2);
}

#[test]
fn without_the_claim_or_without_appliances_nothing_is_filtered() {
    // Control: the same NMI reaches CPU 3 when there is no partition.
    let mut env = FakeEnv::new();
    env.hv.sealed.store(true, Ordering::SeqCst);
    icr(&mut env, 3 << 24, 0x4400);
    assert_eq!(sent(&env), [(3, 4, 0)]);
    icr(&mut env, 0, 0x000c_4400);
    assert_eq!(sent(&env)[1], (0, 4, 3), "the shorthand, unchanged");
}

#[test]
fn an_appliance_cpu_never_reaches_the_os() {
    let mut env = claimed();
    env.cpu = 2;
    icr(&mut env, 0, 0x4400);
    icr(&mut env, 1 << 24, 0xc500);
    icr(&mut env, 0, 0x000c_40ef);
    assert_eq!(sent(&env), [(3, 0, 0)], "only its sibling");
    assert!(!env.hv.cpus()[1].mailbox.take_init());
    assert!(!env.hv.cpus()[0].mailbox.take_init());
    assert_eq!(env.hv.cross_partition_ipis.load(Ordering::SeqCst), 1);
}

#[test]
fn appliance_ram_is_foreign_to_the_os_and_to_other_appliances() {
    let env = FakeEnv::with_appliance();
    let hv = &env.hv;
    assert!(hv.foreign_ram(PartitionId::OS, 0x4000_0000, 1));
    assert!(hv.foreign_ram(PartitionId::OS, 0x3fff_f000, 0x2000));
    assert!(!hv.foreign_ram(PartitionId::OS, 0x5000_0000, 0x1000));
    assert!(!hv.foreign_ram(PartitionId(1), 0x4000_0000, 0x1000));
    assert!(hv.foreign_ram(PartitionId(2), 0x4000_0000, 0x1000));
}

/// `mov qword [rdx], rax`
const STORE64: &[u8] = &[0x48, 0x89, 0x02];
/// `mov dword [rdx], eax`
const STORE32: &[u8] = &[0x89, 0x02];

/// `code` storing `word` (RAX) to the control doorbell from a root
/// process of the OS (CPL 3, its `/dev/mem` mapping) on CPU 0; the CPU
/// after it.
fn ring(env: &mut FakeEnv, code: &[u8], word: u64) -> super::fake::FakeCpu {
    env.cpu = 0;
    let mut cpu = super::tests::at(env, code);
    cpu.cpl = 3;
    cpu.regs[crate::guest::Gpr::Rax as usize] = word;
    cpu.regs[crate::guest::Gpr::Rdx as usize] = env.hv.control_doorbell();
    let exit = crate::exit::Exit::NestedFault {
        gpa: env.hv.control_doorbell(),
        write: true,
        fetch: false,
        present: true,
        guest_table_walk: false,
    };
    super::handle(&exit, &mut cpu, env);
    assert!(cpu.exceptions.is_empty(), "{:?}", cpu.exceptions);
    assert_eq!(cpu.rip, super::tests::RIP + code.len() as u64);
    cpu
}

fn command(op: thinhv_abi::status::ControlOp, partition: u8, seq: u32) -> u64 {
    thinhv_abi::status::ControlCommand { op, partition, seq }.encode()
}

fn with_control(os: bool) -> FakeEnv {
    with_partition(|p| {
        if os {
            p.flags |= thinhv_abi::handoff::partition_flags::OS_CONTROL;
        }
    })
}

/// [`FakeEnv::with_appliance`] with partition 1's hand-off changed by
/// `edit`, claimed and running.
fn with_partition(edit: impl FnOnce(&mut thinhv_abi::handoff::PartitionInfo)) -> FakeEnv {
    let mut env = FakeEnv::with_appliance();
    let mut h = thinhv_abi::handoff::Handoff::new();
    h.cpu_count = 4;
    for (i, c) in env.hv.cpus().iter().enumerate() {
        h.cpus[i] = thinhv_abi::handoff::CpuInfo {
            apic_id: c.apic_id,
            flags: u32::from(i == 0) | (u32::from(c.partition.0) << 8),
        };
    }
    h.partition_count = 1;
    h.partitions[0] = env.hv.appliance(PartitionId(1)).unwrap().info;
    edit(&mut h.partitions[0]);
    let old = &env.hv;
    let mut hv = crate::hv::Hv::from_handoff(&h, APIC);
    hv.protected = old.protected;
    hv.status = old.status;
    hv.phys_addr_bits = old.phys_addr_bits;
    hv.vendor = old.vendor;
    for c in hv.cpus() {
        c.set_state(thinhv_abi::status::CpuState::RUNNING);
    }
    env.hv = hv;
    env.hv.sealed.store(true, Ordering::SeqCst);
    let cpu = hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_eq!(status(&cpu), Status::OK);
    for i in [2, 3] {
        let m = &env.hv.cpus()[i].mailbox;
        assert!(m.take_init());
        let _ = m.take_boot();
    }
    // Running, as after its boot.
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert!(p.transition(PartitionState::STOPPED, PartitionState::RUNNING));
    env.nmis_sent.clear();
    env
}

#[test]
fn the_os_stops_and_starts_an_appliance_through_the_doorbell() {
    use thinhv_abi::status::{ControlOp, ControlResult};
    let mut env = with_control(true);
    ring(&mut env, STORE64, command(ControlOp::Stop, 1, 41));
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::STOPPED);
    // Its two processors were told to stop, and woken to take it.
    assert_eq!(env.nmis_sent, [2, 3]);
    for i in [2, 3] {
        assert!(env.hv.cpus()[i].mailbox.take_init());
        assert!(!env.hv.cpus()[i].mailbox.take_boot());
    }
    assert_eq!(
        *env.control_results.borrow(),
        [ControlResult {
            seq: 41,
            status: Status::OK
        }]
    );
    // Stopping again changes nothing.
    ring(&mut env, STORE64, command(ControlOp::Stop, 1, 42));
    assert_eq!(env.nmis_sent.len(), 2);
    // Start: its first processor is asked to boot it; no INIT.
    ring(&mut env, STORE64, command(ControlOp::Start, 1, 43));
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::STARTING);
    assert!(env.hv.cpus()[2].mailbox.take_boot());
    assert!(!env.hv.cpus()[3].mailbox.take_boot());
    assert!(!env.hv.cpus()[2].mailbox.take_init());
    // Restart from running: INITs first, then the boot.
    assert!(p.transition(PartitionState::STARTING, PartitionState::RUNNING));
    ring(&mut env, STORE64, command(ControlOp::Restart, 1, 44));
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::STARTING);
    assert!(env.hv.cpus()[2].mailbox.take_init());
    assert!(env.hv.cpus()[3].mailbox.take_init());
    assert!(env.hv.cpus()[2].mailbox.take_boot());
    assert_eq!(env.control_results.borrow().last().unwrap().seq, 44);
    // The OS's own processors were never touched.
    assert!(!env.hv.cpus()[1].mailbox.take_init());
}

#[test]
fn control_none_and_malformed_requests_are_refused() {
    use thinhv_abi::status::{ControlOp, ControlResult};
    // The control: the same request where the vendor allows it works.
    let mut env = with_control(true);
    ring(&mut env, STORE64, command(ControlOp::Stop, 1, 1));
    assert_eq!(
        env.hv.appliance(PartitionId(1)).unwrap().state(),
        PartitionState::STOPPED
    );
    // control = "none": refused, whatever the OS's privilege.
    let mut env = with_control(false);
    for op in [ControlOp::Stop, ControlOp::Restart, ControlOp::Start] {
        ring(&mut env, STORE64, command(op, 1, 5));
    }
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::RUNNING);
    assert!(env.nmis_sent.is_empty());
    assert!(env.control_results.borrow().iter().all(|r| *r
        == ControlResult {
            seq: 5,
            status: Status::NOT_PERMITTED
        }));
    // No such appliance, partition 0 (the OS), no magic: invalid.
    let mut env = with_control(true);
    ring(&mut env, STORE64, command(ControlOp::Stop, 2, 6));
    ring(&mut env, STORE64, command(ControlOp::Stop, 0, 7));
    ring(&mut env, STORE64, 0x0000_0000_0008_0101);
    let r = env.control_results.borrow().clone();
    assert_eq!(r.len(), 3);
    assert!(
        r.iter().all(|r| r.status == Status::INVALID_ARGUMENT),
        "{r:?}"
    );
    // A 4-byte store is not a request: discarded, nothing published.
    ring(&mut env, STORE32, command(ControlOp::Stop, 1, 8));
    assert_eq!(env.control_results.borrow().len(), 3);
    assert_eq!(
        env.hv.appliance(PartitionId(1)).unwrap().state(),
        PartitionState::RUNNING
    );
    assert!(env.nmis_sent.is_empty());
}

/// Port I/O from appliance CPU 2; what it read.
fn appliance_io(env: &mut FakeEnv, port: u16, size: u8, input: bool, rax: u64) -> u64 {
    env.hv.cpus()[2].entered.store(true, Ordering::SeqCst);
    super::tests_pcicfg::io(env, 2, port, size, input, rax)
}

#[test]
fn an_appliance_sees_only_its_own_function_with_bars_that_never_move() {
    use thinhv_abi::PhysRange;
    let mut env = with_partition(|p| {
        p.device_count = 1;
        p.devices[0].rid = 0x0100; // 01:00.0
        p.devices[0].vdevfn = 0x08; // its 00:01.0
        p.devices[0].bar_count = 1;
        p.devices[0].bars[0] = PhysRange::new(0xc000_0000, 0x2_0000);
    });
    let real = |reg: u32| 0x8001_0000 | reg;
    for (reg, v) in [
        (0x00, 0x10d3_8086u32),
        (0x04, 0x0010_0000),
        (0x0c, 0x0080_0010),
        (0x10, 0xc000_0000),
        (0x30, 0xfeb0_0000),
        (0x3c, 0x0000_010b),
        (0x40, 0x1234_5678),
    ] {
        env.cf8_space.borrow_mut().insert(real(reg), v);
    }
    let read = |env: &mut FakeEnv, vaddr: u32, size: u8, port: u16| {
        appliance_io(env, 0xcf8, 4, false, u64::from(vaddr));
        appliance_io(env, port, size, true, 0) & 0xffff_ffff
    };
    let write = |env: &mut FakeEnv, vaddr: u32, size: u8, port: u16, v: u32| {
        appliance_io(env, 0xcf8, 4, false, u64::from(vaddr));
        appliance_io(env, port, size, false, u64::from(v));
    };
    // Mechanism 1 works: the latch reads back.
    appliance_io(&mut env, 0xcf8, 4, false, 0x8000_0000);
    assert_eq!(appliance_io(&mut env, 0xcf8, 4, true, 0), 0x8000_0000);
    // Its function at 00:01.0; nothing at 00:00.0 or on bus 1 (where the
    // real function is).
    assert_eq!(read(&mut env, 0x8000_0800, 4, 0xcfc), 0x10d3_8086);
    assert_eq!(read(&mut env, 0x8000_0000, 4, 0xcfc), 0xffff_ffff);
    assert_eq!(read(&mut env, 0x8001_0000, 4, 0xcfc), 0xffff_ffff);
    // Single-function header, no interrupt pin, no ROM, capabilities as
    // they are.
    assert_eq!(read(&mut env, 0x8000_080c, 1, 0xcfe), 0);
    assert_eq!(read(&mut env, 0x8000_083c, 4, 0xcfc), 0x0b);
    assert_eq!(read(&mut env, 0x8000_0830, 4, 0xcfc), 0);
    assert_eq!(read(&mut env, 0x8000_0840, 2, 0xcfe), 0x1234);
    // BAR 0: sizing, and the address back; the real BAR is untouched.
    write(&mut env, 0x8000_0810, 4, 0xcfc, 0xffff_ffff);
    assert_eq!(read(&mut env, 0x8000_0810, 4, 0xcfc), 0xfffe_0000);
    write(&mut env, 0x8000_0810, 4, 0xcfc, 0x1000_0000);
    assert_eq!(read(&mut env, 0x8000_0810, 4, 0xcfc), 0x1000_0000);
    assert_eq!(env.cf8_space.borrow()[&real(0x10)], 0xc000_0000);
    // Command: memory and bus master reach the function, I/O never, and
    // INTx stays disabled (its pin is wired to the OS's I/O APIC), by
    // word or by byte.
    write(&mut env, 0x8000_0804, 2, 0xcfc, 0x0007);
    assert_eq!(env.cf8_space.borrow()[&real(0x04)] & 0xffff, 0x0406);
    write(&mut env, 0x8000_0804, 1, 0xcfd, 0x00);
    assert_eq!(env.cf8_space.borrow()[&real(0x04)] & 0xffff, 0x0406);
    write(&mut env, 0x8000_0804, 1, 0xcfc, 0x02);
    assert_eq!(env.cf8_space.borrow()[&real(0x04)] & 0xffff, 0x0402);
    // The ROM BAR and header type are not written.
    write(&mut env, 0x8000_0830, 4, 0xcfc, 0xffff_ffff);
    assert_eq!(env.cf8_space.borrow()[&real(0x30)], 0xfeb0_0000);
    write(&mut env, 0x8000_080c, 4, 0xcfc, 0xffff_ff20);
    assert_eq!(env.cf8_space.borrow()[&real(0x0c)], 0x0080_ff20);
}

/// The real configuration space of function 01:00.0 (the appliance's
/// 00:01.0): `regs` as (offset, dword).
fn function_config(env: &FakeEnv, regs: &[(u32, u32)]) {
    let mut space = env.cf8_space.borrow_mut();
    for &(reg, v) in regs {
        space.insert(0x8001_0000 | reg, v);
    }
}

/// A PCI Express function capable of FLR: its ID, command (memory and bus
/// mastering on), capability list at 0x40, Device Control 0x2810.
const FLR_CAPABLE: [(u32, u32); 6] = [
    (0x00, 0x10d3_8086),
    (0x04, 0x0010_0006),
    (0x34, 0x40),
    (0x40, 0x0002_0010),
    (0x44, 1 << 28),
    (0x48, 0x0000_2810),
];

/// Word writes with Initiate FLR (bit 15) that reached CONFIG_DATA.
fn flr_writes(env: &FakeEnv) -> usize {
    env.port_log
        .borrow()
        .iter()
        .filter(|&&(rw, port, size, v)| rw == 'w' && port == 0xcfc && size == 2 && v & 0x8000 != 0)
        .count()
}

#[test]
fn an_appliances_own_flr_is_done_by_thinhv_which_puts_the_bars_back() {
    use thinhv_abi::PhysRange;
    let mut env = with_partition(|p| {
        p.tsc_khz = 1000;
        p.device_count = 1;
        p.devices[0].rid = 0x0100;
        p.devices[0].vdevfn = 0x08;
        p.devices[0].bar_count = 1;
        p.devices[0].bars[0] = PhysRange::new(0xc000_0000, 0x2_0000);
    });
    function_config(&env, &FLR_CAPABLE);
    // Its driver had it running (INTx off); what a reset leaves in the
    // BAR, as if the FLR had happened already.
    function_config(&env, &[(0x04, 0x0010_0406), (0x10, 0)]);
    // The appliance's driver: Initiate FLR (word write at Device Control).
    appliance_io(&mut env, 0xcf8, 4, false, 0x8000_0848);
    appliance_io(&mut env, 0xcfc, 2, false, 0xa810);
    let space = env.cf8_space.borrow();
    // thinhv's sequence ran (bus mastering off, memory on, INTx off) and
    // the BAR holds its address again; Device Control as it was.
    assert_eq!(space[&0x8001_0010], 0xc000_0000);
    assert_eq!(space[&0x8001_0004] & 0xffff, 0x0402);
    assert_eq!(space[&0x8001_0048] & 0xffff, 0x2810);
    drop(space);
    assert_eq!(flr_writes(&env), 1, "one FLR, thinhv's");
}

#[test]
fn an_appliance_functions_bars_are_foreign_to_the_os_and_its_writes_there_are_discarded() {
    use thinhv_abi::PhysRange;
    let mut env = with_partition(|p| {
        p.device_count = 1;
        p.devices[0].rid = 0x0028;
        p.devices[0].vdevfn = 0x08;
        p.devices[0].bar_count = 1;
        p.devices[0].bars[0] = PhysRange::new(0xc000_0000, 0x2_0000);
    });
    let os = PartitionId::OS;
    assert!(env.hv.foreign_ram(os, 0xc001_fffc, 4));
    assert!(!env.hv.foreign_ram(os, 0xc002_0000, 4));
    // Its own BAR is not foreign to the appliance.
    assert!(!env.hv.foreign_ram(PartitionId(1), 0xc000_0000, 4));
    // The OS writes RDBAL through the blank page: discarded, counted, the
    // instruction completed; nothing reached the device.
    env.cpu = 0;
    let mut cpu = super::tests::at(&mut env, STORE32);
    cpu.regs[crate::guest::Gpr::Rdx as usize] = 0xc000_2800;
    let h = super::handle(
        &crate::exit::Exit::NestedFault {
            gpa: 0xc000_2800,
            write: true,
            fetch: false,
            present: true,
            guest_table_walk: false,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::PROTECTED_ACCESS);
    assert!(cpu.exceptions.is_empty(), "{:?}", cpu.exceptions);
    assert_eq!(cpu.rip, super::tests::RIP + 2);
    assert_eq!(env.hv.blocked_writes.load(Ordering::SeqCst), 1);
    assert!(env.mmio_log.borrow().is_empty());
}

#[test]
fn a_stop_quiesces_the_appliances_functions() {
    use thinhv_abi::status::ControlOp;
    let mut env = with_partition(|p| {
        p.flags |= thinhv_abi::handoff::partition_flags::OS_CONTROL;
        p.device_count = 1;
        p.devices[0].rid = 0x0100;
        p.devices[0].vdevfn = 0x08;
    });
    // MSI at 0x40, enabled.
    function_config(
        &env,
        &[
            (0x00, 0x10d3_8086),
            (0x04, 0x0010_0006),
            (0x34, 0x40),
            (0x40, 0x0081_0005),
        ],
    );
    ring(&mut env, STORE64, command(ControlOp::Stop, 1, 3));
    // Bus mastering off, INTx disabled, MSI off; no reset on an OS CPU.
    assert_eq!(env.cf8_space.borrow()[&0x8001_0004], 0x0010_0402);
    assert_eq!(env.cf8_space.borrow()[&0x8001_0040], 0x0080_0005);
}

#[test]
fn before_an_appliance_boots_again_its_function_is_reset_and_its_bars_put_back() {
    use thinhv_abi::PhysRange;
    use thinhv_abi::handoff::BAR_REG_64;
    let mut env = with_partition(|p| {
        p.tsc_khz = 1000;
        p.device_count = 1;
        p.devices[0].rid = 0x0100;
        p.devices[0].vdevfn = 0x08;
        p.devices[0].bar_count = 2;
        p.devices[0].bars[0] = PhysRange::new(0xc000_0000, 0x2_0000);
        p.devices[0].bars[1] = PhysRange::new(0x8_0000_4000, 0x4000);
        p.devices[0].bar_regs[1] = 2 | BAR_REG_64;
    });
    function_config(&env, &FLR_CAPABLE);
    // What a reset leaves in the BARs.
    function_config(&env, &[(0x10, 0), (0x18, 0), (0x1c, 0)]);
    assert!(super::partition::reset_devices(&mut env, PartitionId(1)));
    assert_eq!(flr_writes(&env), 1, "Initiate FLR written once");
    let space = env.cf8_space.borrow();
    assert_eq!(space[&0x8001_0010], 0xc000_0000);
    assert_eq!((space[&0x8001_0018], space[&0x8001_001c]), (0x4000, 8));
    // Memory space on; bus mastering for its driver to turn on.
    assert_eq!(space[&0x8001_0004] & 0xffff, 0x0402);
    // The 100 ms after the FLR, at 1000 ticks per read and 1 MHz.
    assert!(env.tsc.get() >= 100_000);
}

/// `mov dword [rdx+offset], eax` at the xAPIC page: the OS or an
/// appliance writing one of its APIC registers.
fn apic_store(env: &mut FakeEnv, offset: u32, value: u32) {
    let mut code = vec![0x89, 0x82];
    code.extend_from_slice(&offset.to_le_bytes());
    let mut cpu = super::tests::at(env, &code);
    cpu.regs[crate::guest::Gpr::Rax as usize] = u64::from(value);
    crate::handlers::handle(
        &super::tests::npf(APIC + u64::from(offset), true, false, true),
        &mut cpu,
        env,
    );
    assert_eq!(cpu.rip, super::tests::RIP + 6);
}

/// An x2APIC ICR write (`wrmsr` to 0x830) from the current CPU.
fn x2apic_icr(env: &mut FakeEnv, value: u64) {
    super::tests_msr::wrmsr(env, 0x830, value);
}

/// Physical destinations of the x2APIC ICR writes that reached the APIC.
fn x2apic_sent(env: &FakeEnv) -> Vec<(u32, u64)> {
    env.x2apic_writes
        .iter()
        .map(|v| ((v >> 32) as u32, (v >> 8) & 7))
        .collect()
}

#[test]
fn the_oss_logical_ipis_reach_only_its_own_cpus() {
    let mut env = claimed();
    // The OS's kernel gives its CPUs flat logical IDs 1 and 2 (Linux's
    // flat driver); the appliance's kernel gives its own 4 and 8 (the
    // hardware keeps 0: thinhv keeps them, `npf::apic_write`).
    for (cpu, ldr) in [(0usize, 1u32), (1, 2), (2, 4), (3, 8)] {
        env.cpu = cpu;
        apic_store(&mut env, 0xe0, u32::MAX);
        apic_store(&mut env, 0xd0, ldr << 24);
    }
    // The OS's writes reached its APIC, the appliance's did not.
    assert!(env.apic_writes.contains(&(0xd0, 2 << 24)));
    assert!(!env.apic_writes.contains(&(0xd0, 4 << 24)));
    env.cpu = 0;
    env.apic_writes.clear();
    // An NMI to every logical ID (0xff), and a fixed IPI naming CPU 1 and
    // the appliance's CPU 2: physical IPIs to the OS's CPUs only.
    icr(&mut env, 0xff << 24, 0x4c00);
    assert_eq!(sent(&env), [(0, 4, 0), (1, 4, 0)]);
    env.apic_writes.clear();
    icr(&mut env, 0x06 << 24, 0x48ef);
    assert_eq!(sent(&env), [(1, 0, 0)]);
    // From the appliance, the same: its own CPUs only.
    env.cpu = 2;
    env.apic_writes.clear();
    icr(&mut env, 0xff << 24, 0x4c00);
    assert_eq!(sent(&env), [(2, 4, 0), (3, 4, 0)]);
    // Control: without appliances the logical IPI reaches the APIC as the
    // OS wrote it (the hardware then matches every logical ID).
    let mut env = FakeEnv::new();
    env.hv.sealed.store(true, Ordering::SeqCst);
    icr(&mut env, 0xff << 24, 0x4c00);
    assert_eq!(env.apic_writes.last(), Some(&(0x300, 0x4c00)));
}

#[test]
fn an_appliance_in_x2apic_mode_reaches_only_its_own_cpus_by_logical_id() {
    let mut env = claimed();
    env.cpu = 2;
    // Cluster 0, the bits of APIC IDs 0–3: only its own 2 and 3.
    x2apic_icr(&mut env, (0x0000_000f << 32) | 0x4c00);
    assert_eq!(x2apic_sent(&env), [(2, 4), (3, 4)]);
    env.x2apic_writes.clear();
    // The logical broadcast: the same two.
    x2apic_icr(&mut env, (0xffff_ffffu64 << 32) | 0x48ef);
    assert_eq!(x2apic_sent(&env), [(2, 0), (3, 0)]);
    env.x2apic_writes.clear();
    // The OS's CPUs 0 and 1 alone, and cluster 1: nothing.
    x2apic_icr(&mut env, (0x0000_0003 << 32) | 0x4c00);
    x2apic_icr(&mut env, (0x0001_000f << 32) | 0x4c00);
    assert!(env.x2apic_writes.is_empty(), "{:?}", env.x2apic_writes);
    // The OS in x2APIC mode naming the appliance's CPU 3 and its own 1.
    env.cpu = 0;
    x2apic_icr(&mut env, (0x0000_000a << 32) | 0x4c00);
    assert_eq!(x2apic_sent(&env), [(1, 4)]);
}

#[test]
fn an_appliances_lint_pins_stay_masked_in_both_apic_modes() {
    let mut env = claimed();
    // xAPIC: Linux's boot processor asks for ExtINT on LINT0 and NMI on
    // LINT1 (virtual wire, as with `noapic`).
    env.cpu = 2;
    apic_store(&mut env, 0x350, 0x700);
    apic_store(&mut env, 0x360, 0x400);
    assert!(env.apic_writes.contains(&(0x350, 0x1_0700)));
    assert!(env.apic_writes.contains(&(0x360, 0x1_0400)));
    // x2APIC: the same through the MSRs; a reserved bit is a #GP.
    env.msrs.insert(0x1b, 0xfee0_0000 | 0xc00);
    super::tests_msr::wrmsr(&mut env, 0x835, 0x700);
    assert_eq!(env.msr_writes.last(), Some(&(0x835, 0x1_0700)));
    let cpu = super::tests_msr::wrmsr(&mut env, 0x836, 1 << 11);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
    // Control: the OS's own CPU gets what it asks for.
    env.cpu = 0;
    env.apic_writes.clear();
    apic_store(&mut env, 0x350, 0x700);
    assert_eq!(env.apic_writes, [(0x350, 0x700)]);
    super::tests_msr::wrmsr(&mut env, 0x836, 0x400);
    assert_eq!(env.msr_writes.last(), Some(&(0x836, 0x400)));
}

#[test]
fn an_appliances_other_ports_are_counted_as_port_io() {
    let mut env = claimed();
    // Its console UART's line status (transmitter empty) and a port of
    // the OS's platform (all-ones); `appliance_io` checks the reason.
    assert_eq!(appliance_io(&mut env, 0x3fd, 1, true, 0) & 0x60, 0x60);
    assert_eq!(appliance_io(&mut env, 0x61, 1, true, 0) & 0xff, 0xff);
}

/// Appliance 1 (restarted on a crash) with VF 3 of the OS's PF 01:00.0
/// (01:10.4) as its 00:01.0 (for [`with_partition`]).
fn vf_partition(p: &mut thinhv_abi::handoff::PartitionInfo) {
    p.tsc_khz = 1000;
    p.flags |= thinhv_abi::handoff::partition_flags::RESTART_ON_CRASH;
    p.device_count = 1;
    p.devices[0].rid = 0x0184;
    p.devices[0].vdevfn = 0x08;
    p.devices[0].pf_rid = 0x0100;
    p.devices[0].vf_ids = 0x10ca_8086;
}

/// The PF's SR-IOV capability at 0x160 shared (the OS's budget 2, NumVFs
/// 3 in the device), behind ECAM; its mediation.
fn share_pf(env: &mut FakeEnv) -> thinhv_abi::handoff::PciMediation {
    use thinhv_abi::handoff::{PCI_ACTION_VF_SHARED, PciMediation, SharedPf};
    let m = PciMediation {
        bus: 1,
        devfn: 0,
        action: PCI_ACTION_VF_SHARED,
        reserved: 0,
        sriov_cap: 0x160,
        os_vfs: 2,
        initial_vfs: 8,
        total_vfs: 8,
        ..Default::default()
    };
    let pci = &mut env.hv.pci;
    pci.ecam_base = 0xb000_0000;
    pci.bus_end = 0xff;
    pci.mediated[0] = m;
    pci.count = 1;
    pci.shared[0] = SharedPf {
        rid: 0x0100,
        cap: 0x160,
        os_vfs: 2,
        initial_vfs: 8,
        num_vfs: 3,
        control: 0x19,
        devctl: 0xa8,
        page_size: 1,
        vf_bars: [0xfe00_000c, 0, 0, 0xfe01_000c, 0, 0],
        vf_bar_masks: [0xffff_c000, !0, 0, 0xffff_c000, !0, 0],
        ..Default::default()
    };
    pci.shared_count = 1;
    *env.hv.shared_pfs.lock() = super::shared_pf::initial(&env.hv.pci);
    env.mmio_write(PF_ECAM + 0x168, 2, 0x19);
    env.mmio_write(PF_ECAM + 0x170, 2, 3);
    env.mmio_write(PF_ECAM + 0x184, 4, 0xfe00_000c);
    m
}

const PF_ECAM: u64 = 0xb000_0000 + (1 << 20);

/// The OS's access to the shared PF's ECAM page at `offset`.
fn pf_access(
    env: &mut FakeEnv,
    m: &thinhv_abi::handoff::PciMediation,
    offset: u16,
    size: u8,
    write: Option<u32>,
) -> u32 {
    env.cpu = 0;
    super::shared_pf::access(env, m, offset, size, write, |env, v| match v {
        Some(v) => {
            env.mmio_write(PF_ECAM + u64::from(offset), size, v);
            0
        }
        None => env.mmio_read(PF_ECAM + u64::from(offset), size),
    })
}

#[test]
fn the_oss_vfs_of_a_shared_pf_find_their_msix_tables_in_the_pfs_vf_bars() {
    let mut env = with_partition(vf_partition);
    share_pf(&mut env);
    // QEMU's igb with NumVFs 3: First VF Offset 0x80, VF Stride 2.
    env.hv.pci.shared[0].first_vf_offset = 0x80;
    env.hv.pci.shared[0].vf_stride = 2;
    // VF 1 (01:10.0) and VF 2 (01:10.2): their slots of VF BAR 0 and VF
    // BAR 3 (64-bit, 16 KiB each).
    assert_eq!(
        super::msi_remap::vf_bar(&mut env, 0x0180, 3),
        Some(0xfe01_0000)
    );
    assert_eq!(
        super::msi_remap::vf_bar(&mut env, 0x0182, 3),
        Some(0xfe01_4000)
    );
    assert_eq!(
        super::msi_remap::vf_bar(&mut env, 0x0182, 0),
        Some(0xfe00_4000)
    );
    // VF 3 (beyond the OS's budget, enabled for the appliance) too; none
    // beyond NumVFs, nor the PF, nor an unimplemented BAR.
    assert_eq!(
        super::msi_remap::vf_bar(&mut env, 0x0184, 3),
        Some(0xfe01_8000)
    );
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0186, 3), None);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0100, 3), None);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0180, 2), None);
    // No VF found by the loader (offset 0): not even VF 1 at the PF's ID.
    env.hv.pci.shared[0].first_vf_offset = 0;
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0100, 3), None);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0180, 3), None);
}

#[test]
fn the_oss_own_vfs_of_a_budget_pf_find_their_msix_tables_where_it_put_its_vf_bars() {
    let mut env = with_partition(vf_partition);
    let pci = &mut env.hv.pci;
    pci.ecam_base = 0xb000_0000;
    pci.bus_end = 0xff;
    pci.budget[0] = thinhv_abi::handoff::SharedPf {
        rid: 0x0100,
        cap: 0x160,
        os_vfs: 2,
        first_vf_offset: 0x80,
        vf_stride: 2,
        page_size: 1,
        vf_bar_masks: [0xffff_c000, !0, 0, 0xffff_c000, !0, 0],
        ..Default::default()
    };
    pci.budget_count = 1;
    env.mmio_write(PF_ECAM + 0x180, 4, 1);
    // The OS's VFs off: nothing.
    env.mmio_write(PF_ECAM + 0x168, 2, 0x10);
    env.mmio_write(PF_ECAM + 0x174, 4, 0x0002_0080);
    env.mmio_write(PF_ECAM + 0x170, 2, 2);
    env.mmio_write(PF_ECAM + 0x190, 4, 0xd001_000c);
    env.mmio_write(PF_ECAM + 0x194, 4, 0);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0182, 3), None);
    // On, with its VF BAR 3 where it put it: VF 2's slot.
    env.mmio_write(PF_ECAM + 0x168, 2, 0x19);
    assert_eq!(
        super::msi_remap::vf_bar(&mut env, 0x0182, 3),
        Some(0xd001_4000)
    );
    assert_eq!(
        super::msi_remap::vf_bar(&mut env, 0x0180, 3),
        Some(0xd001_0000)
    );
    // Beyond NumVFs (1 now), or beyond the budget whatever NumVFs says.
    env.mmio_write(PF_ECAM + 0x170, 2, 1);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0182, 3), None);
    env.mmio_write(PF_ECAM + 0x170, 2, 3);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0184, 3), None);
    // Nor the PF itself.
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0100, 3), None);
    // Another System Page Size than the masks were sized under: unknown.
    env.mmio_write(PF_ECAM + 0x170, 2, 2);
    assert!(super::msi_remap::vf_bar(&mut env, 0x0182, 3).is_some());
    env.mmio_write(PF_ECAM + 0x180, 4, 2);
    assert_eq!(super::msi_remap::vf_bar(&mut env, 0x0182, 3), None);
}

#[test]
fn the_os_turns_its_vfs_off_while_the_appliances_vf_stays_enabled() {
    let mut env = with_partition(vf_partition);
    let m = share_pf(&mut env);
    // The appliance reads its VF's IDs (a VF's own read all ones).
    appliance_io(&mut env, 0xcf8, 4, false, 0x8000_0800);
    assert_eq!(appliance_io(&mut env, 0xcfc, 4, true, 0), 0x10ca_8086);
    // The OS: VFs off (ARI as the firmware left it), its budget.
    assert_eq!(pf_access(&mut env, &m, 0x168, 2, None), 0x10);
    assert_eq!(pf_access(&mut env, &m, 0x16e, 2, None), 2);
    // Its 2 VFs on, then off and NumVFs 0, as Linux does: the device
    // keeps VF Enable and NumVFs 3.
    pf_access(&mut env, &m, 0x170, 2, Some(2));
    pf_access(&mut env, &m, 0x168, 2, Some(0x19));
    assert_eq!(pf_access(&mut env, &m, 0x170, 2, None), 2);
    pf_access(&mut env, &m, 0x168, 2, Some(0x10));
    pf_access(&mut env, &m, 0x170, 2, Some(0));
    // Above the budget: refused.
    pf_access(&mut env, &m, 0x170, 2, Some(3));
    assert_eq!(pf_access(&mut env, &m, 0x170, 2, None), 0);
    assert_eq!(env.hv.refused_pci_writes.load(Ordering::SeqCst), 1);
    assert_eq!(env.mmio_read(PF_ECAM + 0x168, 2), 0x19);
    assert_eq!(env.mmio_read(PF_ECAM + 0x170, 2), 3);
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::RUNNING);
}

#[test]
fn a_pf_reset_by_the_os_gives_the_vfs_back_and_restarts_the_appliance() {
    let mut env = with_partition(vf_partition);
    let m = share_pf(&mut env);
    // The OS's FLR of the PF reaches the device…
    pf_access(&mut env, &m, 0xa8, 2, Some(0x8000));
    assert_eq!(env.mmio_read(PF_ECAM + 0xa8, 2), 0x8000);
    // …which resets its SR-IOV capability.
    env.mmio_write(PF_ECAM + 0x168, 2, 0);
    env.mmio_write(PF_ECAM + 0x170, 2, 0);
    env.mmio_write(PF_ECAM + 0x184, 4, 0xc);
    // Within the 100 ms the OS waits, nothing is written; the OS sees the
    // capability's reset values.
    assert_eq!(pf_access(&mut env, &m, 0x168, 2, None), 0);
    assert_eq!(env.mmio_read(PF_ECAM + 0x170, 2), 0);
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::RUNNING);
    // After them: the setup is back in the device, the appliance crashed
    // (its VF lost its state) and is starting again.
    env.tsc.set(env.tsc.get() + 200_000);
    assert_eq!(pf_access(&mut env, &m, 0x184, 4, None), 0xc);
    assert_eq!(env.mmio_read(PF_ECAM + 0x168, 2), 0x19);
    assert_eq!(env.mmio_read(PF_ECAM + 0x170, 2), 3);
    assert_eq!(env.mmio_read(PF_ECAM + 0x184, 4), 0xfe00_000c);
    let p = env.hv.appliance(PartitionId(1)).unwrap();
    assert_eq!(p.state(), PartitionState::STARTING);
    assert_eq!(p.crashes.load(Ordering::SeqCst), 1);
    // The OS restores its registers (Linux's pci_restore_state): its view.
    pf_access(&mut env, &m, 0x184, 4, Some(0xfe00_0000));
    assert_eq!(pf_access(&mut env, &m, 0x184, 4, None), 0xfe00_000c);
    // Once only: the next access finds the setup in place.
    pf_access(&mut env, &m, 0x168, 2, None);
    assert_eq!(
        env.hv
            .appliance(PartitionId(1))
            .unwrap()
            .crashes
            .load(Ordering::SeqCst),
        1
    );
}

/// An appliance's function with a 64-bit MSI capability at 0x50 (after a
/// PCI Express one at 0x40), remapped or not.
fn msi_function(remapped: bool) -> FakeEnv {
    let mut env = with_partition(|p| {
        p.device_count = 1;
        p.devices[0].rid = 0x0100;
        p.devices[0].vdevfn = 0x08;
    });
    function_config(
        &env,
        &[
            (0x00, 0x11e8_1234),
            (0x04, 0x0010_0006),
            (0x34, 0x40),
            (0x40, 0x0002_5010),
            (0x50, 0x0080_0005),
            (0x54, 0),
            (0x58, 0),
            (0x5c, 0),
        ],
    );
    if remapped {
        env.remapped.push(0x0100);
    }
    env
}

fn appliance_write(env: &mut FakeEnv, reg: u32, size: u8, v: u32) {
    appliance_io(env, 0xcf8, 4, false, u64::from(0x8000_0800 | (reg & 0xfc)));
    appliance_io(env, 0xcfc + (reg & 3) as u16, size, false, u64::from(v));
}

fn appliance_read(env: &mut FakeEnv, reg: u32) -> u32 {
    appliance_io(env, 0xcf8, 4, false, u64::from(0x8000_0800 | reg));
    (appliance_io(env, 0xcfc, 4, true, 0) & 0xffff_ffff) as u32
}

#[test]
fn an_appliances_msi_reaches_only_its_own_processors_through_its_remapping_entry() {
    use thinhv_passthrough::irq_remap::{Delivery, Target};
    let mut env = msi_function(true);
    // Linux: address, high half, data, then enable (with Multiple Message
    // Enable asked for).
    appliance_write(&mut env, 0x54, 4, 0xfee0_2000);
    appliance_write(&mut env, 0x58, 4, 0);
    appliance_write(&mut env, 0x5c, 2, 0x0041);
    appliance_write(&mut env, 0x52, 2, 0x0071);
    let space = |env: &FakeEnv, reg: u32| env.cf8_space.borrow()[&(0x8001_0000 | reg)];
    // The function holds the message naming its MSI entry (the table's
    // last, 511); enabled, one vector.
    assert_eq!(space(&env, 0x54), 0xfee0_0000);
    assert_eq!(space(&env, 0x58), 0);
    assert_eq!(space(&env, 0x5c) & 0xffff, 511);
    assert_eq!(space(&env, 0x50) >> 16, 0x0001);
    // Entry 0: its processor 2 (APIC ID 2), vector 0x41, physical, fixed.
    assert_eq!(
        env.irq_entries[&(0x0100, 511)],
        Some(Target {
            apic_id: 2,
            vector: 0x41,
            delivery: Delivery::Fixed,
            level: false
        })
    );
    // It reads back what it wrote.
    assert_eq!(appliance_read(&mut env, 0x54), 0xfee0_2000);
    assert_eq!(appliance_read(&mut env, 0x5c) & 0xffff, 0x41);
    assert_eq!(env.hv.refused_msis.load(Ordering::SeqCst), 0);
    // Hostile: its processor 3 first (fine), then the OS's processor 1,
    // then an NMI: the entry is taken away, the function's message stays.
    appliance_write(&mut env, 0x54, 4, 0xfee0_3000);
    assert_eq!(env.irq_entries[&(0x0100, 511)].unwrap().apic_id, 3);
    appliance_write(&mut env, 0x54, 4, 0xfee0_1000);
    assert_eq!(env.irq_entries[&(0x0100, 511)], None);
    appliance_write(&mut env, 0x54, 4, 0xfee0_3000);
    appliance_write(&mut env, 0x5c, 2, 0x0400);
    assert_eq!(env.irq_entries[&(0x0100, 511)], None);
    assert_eq!(env.hv.refused_msis.load(Ordering::SeqCst), 2);
    assert_eq!(space(&env, 0x54), 0xfee0_0000);
    assert_eq!(space(&env, 0x5c) & 0xffff, 511);
    assert_eq!(appliance_read(&mut env, 0x5c) & 0xffff, 0x400);
    // Disabled: no entry, whatever it holds.
    appliance_write(&mut env, 0x5c, 2, 0x0041);
    assert!(env.irq_entries[&(0x0100, 511)].is_some());
    appliance_write(&mut env, 0x52, 2, 0x0000);
    assert_eq!(env.irq_entries[&(0x0100, 511)], None);
    // Linux freeing the interrupt: a zeroed message while still enabled.
    // No entry, and nothing refused (it asks for nothing).
    appliance_write(&mut env, 0x52, 2, 0x0001);
    assert!(env.irq_entries[&(0x0100, 511)].is_some());
    appliance_write(&mut env, 0x54, 4, 0);
    appliance_write(&mut env, 0x5c, 2, 0);
    assert_eq!(env.irq_entries[&(0x0100, 511)], None);
    assert_eq!(env.hv.refused_msis.load(Ordering::SeqCst), 2);
}

#[test]
fn without_remapping_an_appliances_msi_reaches_the_function_as_written() {
    // The control: the same writes where the function's messages are not
    // remapped land as written (the OS's processor, NMI), and no entry is
    // written.
    let mut env = msi_function(false);
    appliance_write(&mut env, 0x54, 4, 0xfee0_1000);
    appliance_write(&mut env, 0x5c, 2, 0x0400);
    appliance_write(&mut env, 0x52, 2, 0x0001);
    let space = |env: &FakeEnv, reg: u32| env.cf8_space.borrow()[&(0x8001_0000 | reg)];
    assert_eq!(space(&env, 0x54), 0xfee0_1000);
    assert_eq!(space(&env, 0x5c) & 0xffff, 0x400);
    assert!(env.irq_entries.is_empty());
    assert_eq!(env.hv.refused_msis.load(Ordering::SeqCst), 0);
}
