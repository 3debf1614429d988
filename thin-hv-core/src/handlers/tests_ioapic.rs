//! The OS's I/O APIC entries judged (`handlers::ioapic`): what reaches the
//! hardware, what the OS reads back, the firmware's entries at the first
//! access.
use super::fake::*;
use super::ioapic::IoApicGuard;
use super::{Handled, handle};
use crate::guest::Gpr;
use core::sync::atomic::Ordering;

/// An OS and an appliance (processors 2 and 3), and an I/O APIC of 24
/// entries, every one masked but entry 2, which the firmware left live as
/// an NMI to the appliance's first processor.
fn machine() -> FakeEnv {
    let env = FakeEnv::with_appliance();
    {
        let mut regs = env.ioapic_regs.borrow_mut();
        regs.insert(0x01, 0x0017_0020);
        for pin in 0..24 {
            regs.insert(0x10 + 2 * pin, 0x0001_0000);
            regs.insert(0x11 + 2 * pin, 0);
        }
        regs.insert(0x14, 0x0000_0400);
        regs.insert(0x15, 0x0200_0000);
    }
    env.hv
        .ioapics
        .lock()
        .push(IoApicGuard::new(FAKE_IOAPIC, None));
    // The OS's kernel's flat logical IDs: CPU 0 bit 0, CPU 1 bit 1.
    for i in 0..2 {
        let c = &env.hv.cpus()[i];
        c.vldr.store((1 << i) << 24, Ordering::SeqCst);
        c.vdfr.store(0xffff_ffff, Ordering::SeqCst);
    }
    env
}

/// An access of the OS's processor 0 in the trapped page.
fn access(env: &mut FakeEnv, gpa: u64, value: Option<u32>) -> (u32, Handled) {
    super::tests::trapped_access(env, gpa, value)
}

/// The OS writes entry `pin` (high dword, then low), as Linux does.
fn write_entry(env: &mut FakeEnv, pin: u32, rte: u64) {
    access(env, FAKE_IOAPIC, Some(0x11 + 2 * pin));
    access(env, FAKE_IOAPIC + 0x10, Some((rte >> 32) as u32));
    access(env, FAKE_IOAPIC, Some(0x10 + 2 * pin));
    access(env, FAKE_IOAPIC + 0x10, Some(rte as u32));
}

fn read_entry(env: &mut FakeEnv, pin: u32) -> u64 {
    access(env, FAKE_IOAPIC, Some(0x10 + 2 * pin));
    let lo = access(env, FAKE_IOAPIC + 0x10, None).0;
    access(env, FAKE_IOAPIC, Some(0x11 + 2 * pin));
    let hi = access(env, FAKE_IOAPIC + 0x10, None).0;
    u64::from(hi) << 32 | u64::from(lo)
}

fn hardware(env: &FakeEnv, pin: u32) -> u64 {
    let regs = env.ioapic_regs.borrow();
    u64::from(regs[&(0x11 + 2 * pin)]) << 32 | u64::from(regs[&(0x10 + 2 * pin)])
}

#[test]
fn an_entry_aimed_at_an_appliance_is_masked_and_reads_back_as_the_os_wrote_it() {
    let mut env = machine();
    // Untouched until the OS's first access; then the firmware's live NMI
    // at the appliance is masked, and the OS reads the version register.
    assert_eq!(hardware(&env, 2), 0x0200_0000_0000_0400);
    access(&mut env, FAKE_IOAPIC, Some(0x01));
    let (version, h) = access(&mut env, FAKE_IOAPIC + 0x10, None);
    assert_eq!(version, 0x0017_0020);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::APIC_ACCESS);
    assert_ne!(hardware(&env, 2) & (1 << 16), 0, "masked");
    assert_eq!(env.hv.refused_rtes.load(Ordering::SeqCst), 1);
    // Hostile: an NMI at APIC ID 2 (the appliance's), then INIT and SMI at
    // the OS's own processor 1, then a fixed vector at APIC ID 3. Each is
    // masked in the hardware; the OS reads back what it wrote.
    let hostile = [
        0x0200_0000_0000_0400u64,
        0x0100_0000_0000_0500,
        0x0100_0000_0000_0200,
        0x0300_0000_0000_0041,
    ];
    for (k, rte) in hostile.into_iter().enumerate() {
        write_entry(&mut env, 4, rte);
        assert_eq!(read_entry(&mut env, 4), rte);
        // Masked, naming no one (the vector kept).
        assert_eq!(hardware(&env, 4), (1 << 16) | (rte & 0xff), "{rte:#x}");
        assert_eq!(env.hv.refused_rtes.load(Ordering::SeqCst), 2 + k as u64);
    }
    // Written again: masked, not counted again.
    write_entry(&mut env, 4, hostile[3]);
    assert_eq!(env.hv.refused_rtes.load(Ordering::SeqCst), 5);
    // The NMI at the OS's own processor 1 is the OS's business.
    write_entry(&mut env, 4, 0x0100_0000_0000_0400);
    assert_eq!(hardware(&env, 4), 0x0100_0000_0000_0400);
    // Linux's entry: logical flat 0x02 (its processor 1), lowest
    // priority, level, active low, vector 0x31: physical to APIC ID 1.
    write_entry(&mut env, 9, 0x0200_0000_0000_a931);
    assert_eq!(hardware(&env, 9), 0x0100_0000_0000_a131);
    assert_eq!(read_entry(&mut env, 9), 0x0200_0000_0000_a931);
    // Remote IRR is the hardware's; the OS's mask reaches it.
    env.ioapic_regs.borrow_mut().insert(0x10 + 18, 0x0000_e131);
    assert_eq!(read_entry(&mut env, 9) as u32, 0x0000_e931);
    write_entry(&mut env, 9, 0x0200_0000_0001_a931);
    assert_eq!(hardware(&env, 9) & (1 << 16), 1 << 16);
    // The OS's broadcast logical destination names its own processors
    // only: its first.
    write_entry(&mut env, 10, 0xff00_0000_0000_0841);
    assert_eq!(hardware(&env, 10), 0x0000_0000_0000_0041);
    assert_eq!(env.hv.refused_rtes.load(Ordering::SeqCst), 5);
    // The EOI register is the hardware's.
    access(&mut env, FAKE_IOAPIC + 0x40, Some(0x31));
    assert_eq!(
        env.mmio_log.borrow().last(),
        Some(&('w', FAKE_IOAPIC + 0x40, 4, 0x31))
    );
}

#[test]
fn an_appliance_never_reaches_the_io_apic_through_this_path() {
    let mut env = machine();
    env.cpu = 2;
    let mut cpu = super::tests::at(&mut env, &[0x89, 0x02]);
    cpu.regs[Gpr::Rax as usize] = 0x14;
    let _ = handle(
        &super::tests::npf(FAKE_IOAPIC, true, false, false),
        &mut cpu,
        &mut env,
    );
    assert_ne!(env.ioapic_sel.get(), 0x14);
    assert!(env.hv.ioapics.lock()[0].base == FAKE_IOAPIC);
}

#[test]
fn the_claim_judges_the_firmwares_entries_and_stray_stores_reach_nothing() {
    use thinhv_abi::hypercall::Function;
    let mut env = machine();
    env.hv.sealed.store(true, Ordering::SeqCst);
    // The OS never touches its I/O APIC: the claim judges the firmware's
    // live NMI at the appliance all the same.
    let _ = super::tests::hypercall(&mut env, 0, Function::CLAIM_APPLIANCE_CPUS, [0; 3]);
    assert_ne!(hardware(&env, 2) & (1 << 16), 0, "masked at the claim");
    assert_eq!(env.hv.refused_rtes.load(Ordering::SeqCst), 1);
    // A read-only register, an index past the 24 entries (an alias on
    // some parts), another offset of the page: nothing reaches them.
    access(&mut env, FAKE_IOAPIC, Some(0x01));
    access(&mut env, FAKE_IOAPIC + 0x10, Some(0xdead));
    access(&mut env, FAKE_IOAPIC, Some(0x40));
    access(&mut env, FAKE_IOAPIC + 0x10, Some(0x400));
    access(&mut env, FAKE_IOAPIC + 0x20, Some(5));
    assert_eq!(env.ioapic_regs.borrow()[&0x01], 0x0017_0020);
    assert!(!env.ioapic_regs.borrow().contains_key(&0x40));
    assert!(
        env.mmio_log
            .borrow()
            .iter()
            .all(|&(d, pa, _, _)| d != 'w' || pa != FAKE_IOAPIC + 0x20)
    );
    // The ID register is the hardware's.
    access(&mut env, FAKE_IOAPIC, Some(0x00));
    access(&mut env, FAKE_IOAPIC + 0x10, Some(0x0200_0000));
    assert_eq!(env.ioapic_regs.borrow()[&0x00], 0x0200_0000);
}

#[test]
fn where_the_iommu_remaps_the_io_apic_its_entries_name_a_remapping_entry() {
    use thinhv_passthrough::irq_remap::{Delivery, vtd};
    let mut env = machine();
    env.hv.ioapics.lock()[0].source = Some(0xff00);
    env.remapped.push(0xff00);
    env.vtd_format = true;
    // The firmware's live NMI at the appliance: refused at the first
    // access, and its entry (none yet) left not present.
    access(&mut env, FAKE_IOAPIC, Some(0x01));
    assert_eq!(env.irq_entries.get(&(0xff00, 2)), Some(&None));
    assert_ne!(hardware(&env, 2) & (1 << 16), 0, "masked");
    // Linux's entry for pin 9: level, active low, vector 0x31, logical
    // lowest priority to both of the OS's processors.
    let linux = 0x0300_0000_0000_a931u64;
    write_entry(&mut env, 9, linux);
    let t = env.irq_entries[&(0xff00, 9)].expect("an entry for pin 9");
    assert!(t.apic_id < 2, "one of the OS's processors");
    assert_eq!((t.vector, t.level), (0x31, true));
    assert!(matches!(t.delivery, Delivery::Fixed | Delivery::Lowest));
    // In the hardware: remappable format naming entry 10 (the fake's slot
    // + 1), vector and trigger kept for the EOI, polarity kept, unmasked.
    let hw = hardware(&env, 9);
    assert_eq!(hw, vtd::ioapic_rte(10, &t, true, false));
    // Handle 10 in bits 63:49, format bit 48, level, active low, vector.
    assert_eq!(hw, 0x0015_0000_0000_a031);
    assert_ne!(hw & (1 << 48), 0, "remappable format");
    assert_eq!(hw & 0xff, 0x31);
    assert_eq!(read_entry(&mut env, 9), linux, "reads back as written");
    // Rewritten as an NMI at the appliance's APIC ID 2: masked, and the
    // remapping entry no longer present.
    write_entry(&mut env, 9, 0x0200_0000_0000_0400);
    assert_eq!(env.irq_entries[&(0xff00, 9)], None);
    assert_ne!(hardware(&env, 9) & (1 << 16), 0, "masked");
}

/// The OS's store of `value` (`code`: `mov [rdx], eax` or `rax`) at
/// `gpa` in the HPET's page, which is present and read-only; and whether
/// the instruction completed.
fn hpet_store(env: &mut FakeEnv, gpa: u64, code: &[u8], value: u64) -> (Handled, bool) {
    let mut cpu = super::tests::at(env, code);
    cpu.regs[Gpr::Rax as usize] = value;
    cpu.regs[Gpr::Rdx as usize] = gpa;
    let h = handle(&super::tests::npf(gpa, true, false, true), &mut cpu, env);
    (h, cpu.rip == super::tests::RIP + code.len() as u64)
}

#[test]
fn an_hpet_timer_never_gets_fsb_delivery_from_the_os() {
    const HPET: u64 = 0xfed0_0000;
    let mut env = machine();
    // The control: where the loader names no HPET, such a store is no
    // access thinhv handles (an unexpected fault, #GP).
    let (h, done) = hpet_store(&mut env, HPET + 0x140, &[0x89, 0x02], 0x4104);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::NESTED_FAULT);
    assert!(!done && env.mmio_log.borrow().is_empty());
    env.hv.hpet = HPET;
    // Timer 2: FSB route at the appliance's processor with an NMI, then
    // FSB, 32-bit mode and its interrupt enabled.
    for (off, value) in [(0x150, 0x400), (0x154, 0xfee0_2000), (0x140, 0x4104)] {
        let (h, done) = hpet_store(&mut env, HPET + off, &[0x89, 0x02], value);
        assert!(done);
        assert_eq!(h.reason, thinhv_abi::exit::ExitReason::APIC_ACCESS);
    }
    // A quadword store to timer 0's configuration, as two dwords.
    assert!(hpet_store(&mut env, HPET + 0x100, &[0x48, 0x89, 0x02], 0x4004).1);
    assert_eq!(
        *env.mmio_log.borrow(),
        [
            ('w', HPET + 0x150, 4, 0x400),
            ('w', HPET + 0x154, 4, 0xfee0_2000),
            ('w', HPET + 0x140, 4, 0x100),
            ('w', HPET + 0x100, 4, 0),
            ('w', HPET + 0x104, 4, 0),
        ],
        "everything as written but Tn_FSB_EN_CNF (and the interrupt it was for)"
    );
    assert_eq!(env.hv.refused_fsb.load(Ordering::SeqCst), 2);
}
