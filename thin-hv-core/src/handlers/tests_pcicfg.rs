//! The legacy configuration ports under a hostile guest kernel, on the
//! fakes: each CPU's own address latch, the ports around the data window,
//! and accesses that straddle it. The fake host bridge (`FakeEnv::cf8_space`)
//! decodes the hardware's latch byte by byte, as a chipset does, so an
//! access that reached a function it should not shows in the values.
use super::fake::*;
use super::*;
use crate::guest::Gpr;
use core::sync::atomic::Ordering;
use thinhv_abi::handoff::{PCI_ACTION_HIDE, PCI_ACTION_VF_BUDGET, PciMediation};

const RIP: u64 = 0x10_0000;
const ECAM: u64 = 0xb000_0000;
/// 0000:00:02.0, a function the OS owns.
const ALLOWED: u32 = 0x8000_1000;
const ALLOWED_ID: u32 = 0x1234_abcd;
/// 0000:00:03.0, hidden.
const HIDDEN: u32 = 0x8000_1800;
const HIDDEN_ID: u32 = 0x10d3_8086;
const HIDDEN_COMMAND: u32 = 0x0010_0007;
/// 0000:01:00.0 with the SR-IOV capability at 0x160, 8 VFs, 2 for the OS;
/// its extended registers through AMD's extended CONFIG_ADDRESS (offset
/// bits 11:8 in bits 27:24).
const PF: u32 = 0x8001_0000;
const fn ext(base: u32, offset: u32) -> u32 {
    base | ((offset & 0xf00) << 16) | (offset & 0xfc)
}
const PF_ECAM: u64 = ECAM + (1 << 20);

/// Four CPUs; 00:03.0 hidden, 01:00.0 with a VF budget, 00:02.0 the OS's;
/// the three functions' registers behind the fake host bridge (and the
/// PF's behind ECAM too, where thinhv reads NumVFs).
fn machine() -> FakeEnv {
    let mut env = FakeEnv::new();
    let p = &mut env.hv.pci;
    p.ecam_base = ECAM;
    p.bus_end = 0xff;
    p.mediated[0] = PciMediation {
        bus: 0,
        devfn: 3 << 3,
        action: PCI_ACTION_HIDE,
        ..Default::default()
    };
    p.mediated[1] = PciMediation {
        bus: 1,
        devfn: 0,
        action: PCI_ACTION_VF_BUDGET,
        sriov_cap: 0x160,
        os_vfs: 2,
        initial_vfs: 8,
        total_vfs: 8,
        ..Default::default()
    };
    p.count = 2;
    env.cf8_space.borrow_mut().extend([
        (ALLOWED, ALLOWED_ID),
        (HIDDEN, HIDDEN_ID),
        (HIDDEN | 4, HIDDEN_COMMAND),
        (PF, 0x10c9_8086),
        (ext(PF, 0x16c), 0x0008_0008),
        (ext(PF, 0x170), 0),
    ]);
    env.mmio_write(PF_ECAM, 4, 0x10c9_8086);
    env.mmio_write(PF_ECAM + 0x16c, 4, 0x0008_0008);
    env.mmio_write(PF_ECAM + 0x170, 4, 0);
    env.ports.borrow_mut().insert(0xcfa, 0x5a5a);
    env.ports.borrow_mut().insert(0xd00, 0xc3);
    env
}

/// IN or OUT of `size` bytes at `port` on CPU `cpu`, RAX holding `rax`
/// before; RAX after.
pub(super) fn io(env: &mut FakeEnv, cpu: usize, port: u16, size: u8, input: bool, rax: u64) -> u64 {
    env.cpu = cpu;
    let mut c = FakeCpu {
        rip: RIP,
        hint: Some(RIP + 1),
        ..Default::default()
    };
    c.regs[Gpr::Rax as usize] = rax;
    let h = handle(
        &Exit::PortIo {
            port,
            size,
            input,
            string: false,
        },
        &mut c,
        env,
    );
    // (A page that left the second-level tables meanwhile: this CPU's TLB
    // is flushed.)
    assert!(
        matches!(h.outcome, Outcome::Resume | Outcome::ResumeFlushTlb),
        "{:?}",
        h.outcome
    );
    // Configuration ports count as configuration accesses; an appliance's
    // other ports (all of which exit) as port I/O.
    let expected = if (0xcf8..=0xcff).contains(&port) || env.hv.space_of(cpu).is_os() {
        thinhv_abi::exit::ExitReason::PCI_CONFIG
    } else {
        thinhv_abi::exit::ExitReason::PORT_IO
    };
    assert_eq!(h.reason, expected, "port {port:#x}");
    assert!(c.exceptions.is_empty(), "{:?}", c.exceptions);
    assert_eq!(c.rip, RIP + 1);
    c.regs[Gpr::Rax as usize]
}

fn out32(env: &mut FakeEnv, cpu: usize, port: u16, v: u32) {
    io(env, cpu, port, 4, false, u64::from(v));
}

fn in32(env: &mut FakeEnv, cpu: usize, port: u16) -> u32 {
    // IN EAX zero-extends into RAX.
    let rax = io(env, cpu, port, 4, true, 0xdead_beef_dead_beef);
    assert_eq!(rax >> 32, 0);
    rax as u32
}

/// The hardware's latch before each access to the data window, in order:
/// (latch, the access). Checks that each one came right after thinhv wrote
/// the latch, with the lock held over both.
fn data_accesses(env: &FakeEnv) -> Vec<(u32, (char, u16, u8, u32))> {
    let log = env.port_log.borrow();
    let locked = env.cf8_locked.borrow();
    assert_eq!(
        log.len(),
        locked.len(),
        "every access here is a port access"
    );
    let mut out = Vec::new();
    for (i, e) in log.iter().enumerate() {
        if (0xcfc..0xd00).contains(&e.1) {
            let prev = i.checked_sub(1).map(|j| (log[j], locked[j]));
            let Some((('w', 0xcf8, 4, latch), true)) = prev else {
                panic!("data access {e:?} without its latch write just before: {log:?}");
            };
            assert!(locked[i], "data access {e:?} outside the lock");
            out.push((latch, *e));
        }
    }
    out
}

/// Whether the machine's latch ever selected the hidden function.
fn latch_ever_hidden(env: &FakeEnv) -> bool {
    env.port_log
        .borrow()
        .iter()
        .any(|e| e.0 == 'w' && e.1 == 0xcf8 && e.2 == 4 && e.3 & 0x80ff_ff00 == HIDDEN)
}

#[test]
fn each_cpu_has_its_own_configuration_address() {
    let mut env = machine();
    // CPU 0 selects the OS's function; CPU 1, racing, selects the hidden
    // one. CPU 0 still reads what it selected.
    out32(&mut env, 0, 0xcf8, ALLOWED);
    out32(&mut env, 1, 0xcf8, HIDDEN);
    assert_eq!(in32(&mut env, 0, 0xcfc), ALLOWED_ID);
    assert_eq!(in32(&mut env, 1, 0xcfc), u32::MAX, "hidden");
    // Each reads back its own latch.
    assert_eq!(in32(&mut env, 0, 0xcf8), ALLOWED);
    assert_eq!(in32(&mut env, 1, 0xcf8), HIDDEN);
    // The other way round: CPU 0 asks for the hidden function and CPU 1
    // moves to an allowed one between CPU 0's OUT and IN (the
    // check-then-access race): CPU 0 still gets nothing, CPU 1 its own.
    out32(&mut env, 0, 0xcf8, HIDDEN);
    out32(&mut env, 1, 0xcf8, ALLOWED);
    assert_eq!(in32(&mut env, 0, 0xcfc), u32::MAX);
    assert_eq!(in32(&mut env, 1, 0xcfc), ALLOWED_ID);
    // Every data access thinhv made was its CPU's latch, then the data
    // port, under the lock; none of them selected the hidden function.
    let accesses = data_accesses(&env);
    assert_eq!(accesses.len(), 2, "{accesses:?}");
    assert!(accesses.iter().all(|(latch, _)| *latch == ALLOWED));
    assert!(!latch_ever_hidden(&env));
    // The guests' OUTs to 0xCF8 never reached the machine's latch.
    assert_eq!(
        env.port_log
            .borrow()
            .iter()
            .filter(|e| e.1 == 0xcf8)
            .count(),
        2,
        "only thinhv's own latch writes: {:?}",
        env.port_log.borrow()
    );
}

#[test]
fn a_hidden_function_reads_all_ones_through_cf8_and_cfc() {
    let mut env = machine();
    out32(&mut env, 2, 0xcf8, HIDDEN);
    // Every width and byte of the window.
    assert_eq!(in32(&mut env, 2, 0xcfc), u32::MAX);
    let rax = 0x1111_2222_3333_4444;
    assert_eq!(io(&mut env, 2, 0xcfe, 2, true, rax), 0x1111_2222_3333_ffff);
    assert_eq!(io(&mut env, 2, 0xcff, 1, true, rax), 0x1111_2222_3333_44ff);
    // Writes are dropped: the command register keeps its value.
    out32(&mut env, 2, 0xcf8, HIDDEN | 4);
    io(&mut env, 2, 0xcfc, 2, false, 0x0400);
    out32(&mut env, 2, 0xcfc, 0);
    assert_eq!(env.cf8_space.borrow()[&(HIDDEN | 4)], HIDDEN_COMMAND);
    // The hidden function's address never even reached the machine's
    // latch, and no access went to the hardware at all.
    assert!(!latch_ever_hidden(&env));
    assert!(
        env.port_log.borrow().is_empty(),
        "{:?}",
        env.port_log.borrow()
    );
    // With the enable bit clear the data ports are ordinary I/O, as on
    // hardware: performed with that (disabled) address in the latch.
    out32(&mut env, 2, 0xcf8, HIDDEN & !(1 << 31));
    env.ports.borrow_mut().insert(0xcfc, 0x77);
    assert_eq!(in32(&mut env, 2, 0xcfc), 0x77);
    assert_eq!(
        data_accesses(&env),
        [(HIDDEN & !(1 << 31), ('r', 0xcfc, 4, 0x77))]
    );
}

#[test]
fn a_dword_at_0xcfa_is_mediated_for_its_data_bytes() {
    let mut env = machine();
    out32(&mut env, 0, 0xcf8, HIDDEN);
    // IN EAX at 0xCFA: bytes 0xCFA-0xCFB are ordinary I/O, 0xCFC-0xCFD the
    // hidden function's Vendor ID, which reads as all ones.
    assert_eq!(in32(&mut env, 0, 0xcfa), 0xffff_5a5a);
    // IN AX at 0xCFB: one byte of each.
    let rax = io(&mut env, 0, 0xcfb, 2, true, 0);
    assert_eq!(rax & 0xff00, 0xff00, "{rax:#x}");
    // IN EAX at 0xCFD: three data bytes and port 0xD00.
    assert_eq!(in32(&mut env, 0, 0xcfd), 0xc3ff_ffff);
    // OUT EAX at 0xCFA to the command register: the data bytes are
    // dropped, the ordinary bytes go out as a word at 0xCFA.
    out32(&mut env, 0, 0xcf8, HIDDEN | 4);
    out32(&mut env, 0, 0xcfa, 0x0400_1234);
    assert_eq!(env.cf8_space.borrow()[&(HIDDEN | 4)], HIDDEN_COMMAND);
    assert!(
        env.port_log.borrow().contains(&('w', 0xcfa, 2, 0x1234)),
        "{:?}",
        env.port_log.borrow()
    );
    assert!(!latch_ever_hidden(&env));
    // Aimed at the OS's function, the same access reads its ID (and the
    // word just written at 0xCFA).
    out32(&mut env, 0, 0xcf8, ALLOWED);
    assert_eq!(
        in32(&mut env, 0, 0xcfa),
        ((ALLOWED_ID & 0xffff) << 16) | 0x1234
    );
    assert_eq!(data_accesses(&env).len(), 1);
}

#[test]
fn a_byte_at_0xcf9_is_forwarded_and_is_not_the_latch() {
    let mut env = machine();
    // The map traps 0xCF8..=0xCFF: 0xCF9 (and a dword at 0xCF8) exit.
    let mut map = [0u8; 3 * 4096];
    pcicfg::trap_config_ports(&mut map);
    let trapped = |p: u16| map[usize::from(p / 8)] & (1 << (p % 8)) != 0;
    for p in 0xcf8..=0xcffu16 {
        assert!(trapped(p), "{p:#x}");
    }
    assert!(!trapped(0xcf7) && !trapped(0xd00));
    assert_eq!(map.iter().map(|b| b.count_ones()).sum::<u32>(), 8);
    out32(&mut env, 0, 0xcf8, ALLOWED);
    // OUT AL to 0xCF9 (the reset control register on PC chipsets) and OUT
    // AX to 0xCF8: ordinary I/O, unchanged, outside the lock.
    io(&mut env, 0, 0xcf9, 1, false, 0x1_02);
    io(&mut env, 0, 0xcf8, 2, false, 0x1800);
    assert_eq!(
        *env.port_log.borrow(),
        [('w', 0xcf9, 1, 0x02), ('w', 0xcf8, 2, 0x1800)]
    );
    assert_eq!(*env.cf8_locked.borrow(), [false, false]);
    // IN AL from 0xCF9: the hardware's byte.
    env.ports.borrow_mut().insert(0xcf9, 0x06);
    assert_eq!(io(&mut env, 0, 0xcf9, 1, true, 0xaa00), 0xaa06);
    // Neither changed this CPU's latch: a dword at 0xCFC still reaches the
    // OS's function, not 00:03.0 (0x1800).
    assert_eq!(in32(&mut env, 0, 0xcf8), ALLOWED);
    assert_eq!(in32(&mut env, 0, 0xcfc), ALLOWED_ID);
}

#[test]
fn a_vf_budget_write_through_an_overlapping_access_is_refused() {
    let mut env = machine();
    let refused = |env: &FakeEnv| env.hv.refused_pci_writes.load(Ordering::Relaxed);
    // NumVFs (0x170) selected; NumVFs = 3 through a dword at 0xCFA (data
    // bytes 0-1) and through a word at 0xCFB (data byte 0): both refused.
    out32(&mut env, 1, 0xcf8, ext(PF, 0x170));
    out32(&mut env, 1, 0xcfa, 0x0003_0000);
    assert_eq!(env.cf8_space.borrow()[&ext(PF, 0x170)], 0);
    assert_eq!(refused(&env), 1);
    io(&mut env, 1, 0xcfb, 2, false, 0x0300);
    assert_eq!(env.cf8_space.borrow()[&ext(PF, 0x170)], 0);
    assert_eq!(refused(&env), 2);
    // Within the budget it reaches the device.
    out32(&mut env, 1, 0xcfa, 0x0002_0000);
    assert_eq!(env.cf8_space.borrow()[&ext(PF, 0x170)], 2);
    assert_eq!(refused(&env), 2);
    // InitialVFs and TotalVFs read as the budget through the same kind of
    // access.
    out32(&mut env, 1, 0xcf8, ext(PF, 0x16c));
    assert_eq!(in32(&mut env, 1, 0xcfa) >> 16, 2, "InitialVFs");
    assert_eq!(in32(&mut env, 1, 0xcfe) & 0xffff, 2, "TotalVFs");
    // Each access to the PF went out as latch + data under the lock.
    assert!(
        data_accesses(&env)
            .iter()
            .all(|(latch, _)| *latch & !3 == ext(PF, 0x170) || *latch & !3 == ext(PF, 0x16c))
    );
}

/// An NVMe PF thinhv keeps at 01:00.0, whose VF 1 (01:00.1: its IDs read
/// all ones, its BARs 0) the OS sees in its place.
fn presenting() -> FakeEnv {
    use thinhv_abi::PhysRange;
    use thinhv_abi::handoff::{BAR_REG_64, PCI_ACTION_PRESENT_VF, PartitionDevice};
    let mut env = machine();
    env.hv.pci.mediated[1] = PciMediation {
        bus: 1,
        devfn: 0,
        action: PCI_ACTION_PRESENT_VF,
        reserved: 0,
        ..Default::default()
    };
    let mut vf = PartitionDevice {
        rid: 0x0101,
        vf_ids: 0x0010_1b36,
        pf_rid: 0x0100,
        bar_count: 1,
        ..Default::default()
    };
    vf.bars[0] = PhysRange::new(0xc100_4000, 0x4000);
    vf.bar_regs[0] = BAR_REG_64;
    // Its Enhanced Allocation capability at 0x4c (`fixed_bar`).
    vf.vdevfn = 0x4c;
    env.hv.pci.presented[0] = vf;
    env.hv.presented_bars.lock()[0] = crate::partition::BarShadow::new(&vf);
    env.cf8_space.borrow_mut().extend([
        (VF1, 0xffff_ffff),
        (VF1 | 4, 0x0010_0000),
        (VF1 | 8, 0x0108_0200),
        (VF1 | 0x10, 0),
        (VF1 | 0x14, 0),
        (VF1 | 0x34, 0x60),
        (VF1 | 0x4c, 0),
    ]);
    env
}

/// 0000:01:00.1 through CONFIG_ADDRESS.
const VF1: u32 = 0x8001_0100;

#[test]
fn the_os_sees_the_vf_thinhv_presents_in_a_kept_pfs_place() {
    let mut env = presenting();
    let read = |env: &mut FakeEnv, reg: u32| {
        out32(env, 0, 0xcf8, PF | reg);
        in32(env, 0, 0xcfc)
    };
    // Its IDs: the PF's vendor and the VF device ID (the VF's own read all
    // ones); its class the VF's own.
    assert_eq!(read(&mut env, 0), 0x0010_1b36);
    assert_eq!(read(&mut env, 8), 0x0108_0200);
    // Its BAR 0: the VF's slot of the PF's VF BAR, 64-bit; sizing answers
    // the slot's size and never reaches the device.
    assert_eq!(read(&mut env, 0x10), 0xc100_4004);
    assert_eq!(read(&mut env, 0x14), 0);
    out32(&mut env, 0, 0xcf8, PF | 0x10);
    out32(&mut env, 0, 0xcfc, 0xffff_ffff);
    assert_eq!(in32(&mut env, 0, 0xcfc), 0xffff_c004);
    out32(&mut env, 0, 0xcfc, 0xc100_4000);
    assert_eq!(read(&mut env, 0x10), 0xc100_4004);
    assert_eq!(env.cf8_space.borrow()[&(VF1 | 0x10)], 0);
    // Its capability list starts with an Enhanced Allocation capability
    // fixing BAR 0 (the OS never moves it), then the VF's own; a write
    // there reaches nothing.
    assert_eq!(read(&mut env, 0x34), 0x4c);
    assert_eq!(read(&mut env, 0x4c), 0x0001_6014);
    assert_eq!(read(&mut env, 0x50), 0x80ff_0002);
    assert_eq!(read(&mut env, 0x54), 0xc100_4000);
    assert_eq!(read(&mut env, 0x58), 0x3ffc);
    out32(&mut env, 0, 0xcf8, PF | 0x54);
    out32(&mut env, 0, 0xcfc, 0x1234_0000);
    assert_eq!(read(&mut env, 0x54), 0xc100_4000);
    assert_eq!(env.cf8_space.borrow()[&(VF1 | 0x4c)], 0);
    // Memory space and bus mastering reach the VF (INTx Disable on: a VF
    // has no INTx).
    out32(&mut env, 0, 0xcf8, PF | 4);
    out32(&mut env, 0, 0xcfc, 0x0000_0006);
    assert_eq!(env.cf8_space.borrow()[&(VF1 | 4)] & 0xffff, 0x0406);
    // Not one access reached the PF's own registers.
    assert!(
        data_accesses(&env)
            .iter()
            .all(|(latch, _)| latch & !0xff != PF & !0xff),
        "{:?}",
        data_accesses(&env)
    );
    assert_eq!(env.cf8_space.borrow()[&PF], 0x10c9_8086);
}

#[test]
fn the_oss_msi_in_logical_mode_becomes_an_entry_for_the_processor_its_kernel_named() {
    use thinhv_passthrough::irq_remap::{Delivery, Target};
    // 00:02.0, the OS's, signals by MSI (32-bit address, at 0x50); its
    // messages are remapped.
    let mut env = remapped_function(0x50);
    env.cf8_space.borrow_mut().extend([
        (ALLOWED | 4, 0x0010_0006),
        (ALLOWED | 0x34, 0x50),
        (ALLOWED | 0x50, 0x0000_0005),
        (ALLOWED | 0x54, 0),
        (ALLOWED | 0x58, 0),
    ]);
    // Its kernel's flat logical IDs: CPU 0 bit 0, CPU 1 bit 1.
    for (i, c) in env.hv.cpus().iter().enumerate() {
        c.vldr.store((1 << i) << 24, Ordering::SeqCst);
        c.vdfr.store(0xffff_ffff, Ordering::SeqCst);
    }
    let out = |env: &mut FakeEnv, reg: u32, size: u8, v: u32| {
        io(env, 0, 0xcf8, 4, false, u64::from(ALLOWED | reg));
        io(env, 0, 0xcfc, size, false, u64::from(v));
    };
    // Logical destination 0x02 (CPU 1), vector 0x41, then enable.
    out(&mut env, 0x54, 4, 0xfee0_2004);
    out(&mut env, 0x58, 2, 0x0041);
    out(&mut env, 0x50, 4, 0x0001_0005);
    assert_eq!(
        env.irq_entries[&(0x0010, 511)],
        Some(Target {
            apic_id: 1,
            vector: 0x41,
            delivery: Delivery::Fixed,
            level: false
        })
    );
    // The function holds the message naming its MSI entry (511); the OS
    // reads back its own.
    assert_eq!(env.cf8_space.borrow()[&(ALLOWED | 0x54)], 0xfee0_0000);
    assert_eq!(env.cf8_space.borrow()[&(ALLOWED | 0x58)] & 0xffff, 511);
    io(&mut env, 0, 0xcf8, 4, false, u64::from(ALLOWED | 0x54));
    assert_eq!(io(&mut env, 0, 0xcfc, 4, true, 0), 0xfee0_2004);
    // A mask naming none of its processors' logical IDs: refused.
    out(&mut env, 0x54, 4, 0xfee1_0004);
    assert_eq!(env.irq_entries[&(0x0010, 511)], None);
    assert_eq!(env.hv.refused_msis.load(Ordering::SeqCst), 1);
    // The rest of its configuration space is as written.
    out(&mut env, 0x04, 2, 0x0407);
    assert_eq!(env.cf8_space.borrow()[&(ALLOWED | 4)] & 0xffff, 0x0407);
}

/// [`machine`] with 00:02.0 (the OS's) mediated as `PCI_ACTION_MSI` (its
/// MSI capability at `msi`, 0 for none) and its messages remapped.
fn remapped_function(msi: u16) -> FakeEnv {
    let mut env = machine();
    let k = env.hv.pci.count as usize;
    env.hv.pci.mediated[k] = PciMediation {
        bus: 0,
        devfn: 2 << 3,
        action: thinhv_abi::handoff::PCI_ACTION_MSI,
        sriov_cap: msi,
        ..Default::default()
    };
    env.hv.pci.count += 1;
    env.remapped.push(0x0010);
    env
}

/// 00:02.0 with MSI-X (4 entries, table at BAR 0 + 0x2000, BAR 0 at
/// 0xc000_0000), its messages remapped; every entry masked.
fn msix_function() -> FakeEnv {
    let mut env = remapped_function(0);
    env.cf8_space.borrow_mut().extend([
        (ALLOWED | 4, 0x0010_0006),
        (ALLOWED | 0x10, 0xc000_0000),
        (ALLOWED | 0x34, 0x70),
        (ALLOWED | 0x70, 0x0003_0011),
        (ALLOWED | 0x74, 0x0000_2000),
        (ALLOWED | 0x78, 0x0000_3000),
    ]);
    for i in 0..4u64 {
        let e = 0xc000_2000 + 16 * i;
        env.mmio_write(e, 4, 0);
        env.mmio_write(e + 4, 4, 0);
        env.mmio_write(e + 8, 4, 0);
        env.mmio_write(e + 12, 4, 1);
    }
    env
}

#[test]
fn the_oss_msix_table_is_trapped_at_enable_and_its_entries_judged_at_unmask() {
    use thinhv_passthrough::irq_remap::{Delivery, Target};
    let mut env = msix_function();
    // MSI-X Enable (with Function Mask, as Linux does first).
    io(&mut env, 0, 0xcf8, 4, false, u64::from(ALLOWED | 0x70));
    io(&mut env, 0, 0xcfe, 2, false, 0xc003);
    assert!(
        env.slat_holes.contains(&0xc000_2000),
        "{:?}",
        env.slat_holes
    );
    assert!(
        !env.hv.cpus()[0].flush_tlb.load(Ordering::SeqCst),
        "taken by the exit's outcome"
    );
    // Every other processor of the OS flushes at its next exit, which a
    // wake-up NMI forces (counted, so not given to its guest).
    for i in 1..4 {
        let c = &env.hv.cpus()[i];
        assert!(c.flush_tlb.load(Ordering::SeqCst), "cpu {i}");
        assert_eq!(c.mailbox.wake_nmis.load(Ordering::SeqCst), 1, "cpu {i}");
    }
    assert_eq!(env.nmis_sent, [1, 2, 3]);
    // CPU 1's kick: an NMI exit, no NMI for its guest, and the flush.
    env.cpu = 1;
    let mut cpu = super::tests::at(&mut env, &[0x90]);
    let h = handle(&Exit::Nmi, &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::ResumeFlushTlb);
    assert_eq!(cpu.nmis, 0, "a kick, not the guest's NMI");
    assert!(!env.hv.cpus()[1].flush_tlb.load(Ordering::SeqCst));
    env.cpu = 0;
    // Entry 1: its processor 1, vector 0x41; then unmasked.
    super::tests::trapped_access(&mut env, 0xc000_2010, Some(0xfee0_1000));
    super::tests::trapped_access(&mut env, 0xc000_2014, Some(0));
    super::tests::trapped_access(&mut env, 0xc000_2018, Some(0x41));
    assert_eq!(
        env.irq_entries.get(&(0x0010, 1)),
        Some(&None),
        "masked: no entry yet"
    );
    let (_, h) = super::tests::trapped_access(&mut env, 0xc000_201c, Some(0));
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::PCI_CONFIG);
    assert_eq!(
        env.irq_entries[&(0x0010, 1)],
        Some(Target {
            apic_id: 1,
            vector: 0x41,
            delivery: Delivery::Fixed,
            level: false
        })
    );
    // The function holds the message naming entry 1, unmasked; the OS
    // reads its own.
    assert_eq!(env.mmio_read(0xc000_2010, 4), 0xfee0_0000);
    assert_eq!(env.mmio_read(0xc000_2018, 4), 1);
    assert_eq!(env.mmio_read(0xc000_201c, 4), 0);
    assert_eq!(
        super::tests::trapped_access(&mut env, 0xc000_2010, None).0,
        0xfee0_1000
    );
    assert_eq!(
        super::tests::trapped_access(&mut env, 0xc000_2018, None).0,
        0x41
    );
    assert_eq!(
        super::tests::trapped_access(&mut env, 0xc000_201c, None).0,
        0
    );
    // Hostile: an NMI, then a processor that is not the OS's: no entry,
    // two refusals; the function still holds the message naming entry 1.
    super::tests::trapped_access(&mut env, 0xc000_2018, Some(0x400));
    assert_eq!(env.irq_entries[&(0x0010, 1)], None);
    super::tests::trapped_access(&mut env, 0xc000_2018, Some(0x41));
    super::tests::trapped_access(&mut env, 0xc000_2010, Some(0xfee0_9000));
    assert_eq!(env.irq_entries[&(0x0010, 1)], None);
    assert_eq!(env.hv.refused_msis.load(Ordering::SeqCst), 2);
    assert_eq!(env.mmio_read(0xc000_2010, 4), 0xfee0_0000);
    assert_eq!(env.mmio_read(0xc000_2018, 4), 1);
    // Disabled, then enabled without Function Mask, as a driver may: the
    // function gets it masked first, its entries are written, then the
    // owner's value.
    io(&mut env, 0, 0xcf8, 4, false, u64::from(ALLOWED | 0x70));
    io(&mut env, 0, 0xcfe, 2, false, 0x0003);
    let before = env.port_log.borrow().len();
    io(&mut env, 0, 0xcfe, 2, false, 0x8003);
    let controls: Vec<u32> = env.port_log.borrow()[before..]
        .iter()
        .filter(|(d, port, _, _)| *d == 'w' && *port == 0xcfe)
        .map(|&(_, _, _, v)| v)
        .collect();
    assert_eq!(controls, [0xc003, 0x8003]);
    // Beyond the table (its PBA page is not trapped; in the table's page
    // past its 4 entries): the function's.
    env.mmio_write(0xc000_2040, 4, 0x1234);
    assert_eq!(
        super::tests::trapped_access(&mut env, 0xc000_2040, None).0,
        0x1234
    );
}

#[test]
fn a_trapped_table_moved_where_it_is_refused_is_forgotten_and_the_function_stays_masked() {
    use thinhv_passthrough::irq_remap::{Delivery, Target};
    // Trapped at 0xc000_2000, entry 1 judged for the OS's processor 1.
    let mut env = msix_function();
    io(&mut env, 0, 0xcf8, 4, false, u64::from(ALLOWED | 0x70));
    io(&mut env, 0, 0xcfe, 2, false, 0xc003);
    super::tests::trapped_access(&mut env, 0xc000_2010, Some(0xfee0_1000));
    super::tests::trapped_access(&mut env, 0xc000_2018, Some(0x41));
    super::tests::trapped_access(&mut env, 0xc000_201c, Some(0));
    assert_eq!(
        env.irq_entries[&(0x0010, 1)],
        Some(Target {
            apic_id: 1,
            vector: 0x41,
            delivery: Delivery::Fixed,
            level: false
        })
    );
    // MSI-X off, the BAR moved onto the HPET, MSI-X on without Function
    // Mask: refused, and the old trap does not count for it.
    io(&mut env, 0, 0xcfe, 2, false, 0x0003);
    env.cf8_space
        .borrow_mut()
        .insert(ALLOWED | 0x10, 0xfed0_0000 - 0x2000);
    io(&mut env, 0, 0xcfe, 2, false, 0x8003);
    assert_eq!(
        env.cf8_space.borrow()[&(ALLOWED | 0x70)] >> 16,
        0xc003,
        "the function stays masked"
    );
    assert!(env.hv.msix.lock().is_empty(), "the old table forgotten");
    assert!(
        !env.slat_holes.contains(&0xc000_2000),
        "its page given back"
    );
    assert_eq!(
        env.irq_entries[&(0x0010, 1)],
        None,
        "its entries not present"
    );
}

#[test]
fn an_msix_table_the_owner_put_out_of_reach_is_refused_and_stays_remapped() {
    // Outside thinhv's map (the trap fails): no entry is ever written, the
    // function's messages stay remapped (so all aborted): the owner cannot
    // turn remapping off by moving its BAR.
    let mut env = msix_function();
    env.apic_trap_ok = false;
    io(&mut env, 0, 0xcf8, 4, false, u64::from(ALLOWED | 0x70));
    io(&mut env, 0, 0xcfe, 2, false, 0x8003);
    // Enabled without Function Mask: it reached the function masked, and
    // stays so (no entry of a table thinhv does not follow may send).
    assert_eq!(env.cf8_space.borrow()[&(ALLOWED | 0x70)] >> 16, 0xc003);
    assert!(env.slat_holes.is_empty());
    assert!(env.remapped.contains(&0x0010), "still remapped");
    assert!(env.hv.msix.lock().is_empty());
    assert!(env.irq_entries.is_empty());
    // On another partition's or thinhv's memory, the interrupt window, or
    // the platform's own registers thinhv would write entries into (the
    // HPET's, an IOMMU unit's outside the chipset range, a function's
    // configuration space through ECAM): refused before any trap.
    let mut env = msix_function();
    env.hv.iommu_windows[0] = thinhv_abi::PhysRange::new(0xfd80_0000, 0x8_0000);
    for bar in [
        0xfee0_0000u32,
        (PROTECTED.base as u32) & !0xfff,
        0xfed0_0000,
        0xfd80_0000 + 0x1000,
        (ECAM as u32) + (3 << 15),
    ] {
        env.cf8_space
            .borrow_mut()
            .insert(ALLOWED | 0x10, bar.wrapping_sub(0x2000));
        io(&mut env, 0, 0xcf8, 4, false, u64::from(ALLOWED | 0x70));
        io(&mut env, 0, 0xcfe, 2, false, 0x8003);
        assert!(env.slat_holes.is_empty(), "{bar:#x}");
        assert!(env.hv.msix.lock().is_empty(), "{bar:#x}");
    }
}
