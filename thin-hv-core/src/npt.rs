//! The guest's second-level map: identity for everything, except
//!
//! * the protected region, every page of which maps to one blank (zero)
//!   frame, read-only and not executable: reads return zeros, writes fault
//!   and are discarded;
//! * the status page, mapped read-only;
//! * the xAPIC page, read-only and uncached, so that writes (the ICR among
//!   them) trap and reads go straight to the APIC.
use thinhv_abi::PhysRange;
use thinhv_paging::{Attrs, EntryFormat, FrameAlloc, MapError, Mapper, PhysMem};

/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// What the map looks like.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Identity-map `[0, top)` at start (rounded up to 1 GiB; addresses
    /// above are mapped on first touch).
    pub top: u64,
    /// The protected region.
    pub protected: PhysRange,
    /// The blank frame (inside the protected region).
    pub blank: u64,
    /// The status page.
    pub status: PhysRange,
    /// The xAPIC page, if the APIC is in xAPIC mode.
    pub apic_page: Option<u64>,
}

/// Builds the map; returns the root.
pub fn build<F: EntryFormat, M: PhysMem>(
    fmt: &F,
    mem: &mut M,
    alloc: &mut impl FrameAlloc,
    plan: &Plan,
) -> Result<u64, MapError> {
    let top = plan.top.max(4 * GIB).div_ceil(GIB) * GIB;
    let mut m = Mapper::create(fmt, mem, alloc)?;
    m.map(0, 0, top, Attrs::RWX, alloc)?;
    m.map_all_to_frame(
        plan.protected.base,
        plan.protected.size,
        plan.blank,
        Attrs::RO,
        alloc,
    )?;
    m.map(
        plan.status.base,
        plan.status.base,
        plan.status.size,
        Attrs::RO,
        alloc,
    )?;
    if let Some(apic) = plan.apic_page {
        m.map(apic, apic, 4096, Attrs::MMIO_RO, alloc)?;
    }
    Ok(m.root())
}

/// Maps the GiB containing `gpa` identity, read/write/execute (a first
/// touch above the initial map). Refuses addresses at or beyond
/// `2^phys_bits` and any GiB that holds part of `avoid` ranges.
pub fn demand_map<F: EntryFormat, M: PhysMem>(
    fmt: &F,
    mem: &mut M,
    alloc: &mut impl FrameAlloc,
    root: u64,
    gpa: u64,
    phys_bits: u32,
    avoid: &[PhysRange],
) -> bool {
    if phys_bits < 64 && gpa >= 1u64 << phys_bits.min(52) {
        return false;
    }
    let base = gpa & !(GIB - 1);
    if avoid.iter().any(|r| r.overlaps(base, GIB)) {
        return false;
    }
    let mut m = Mapper::open(fmt, mem, root);
    if m.translate(gpa).is_some() {
        // Already there (another CPU mapped it): just retry the access.
        return true;
    }
    m.map(base, base, GIB, Attrs::RWX, alloc).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use thinhv_paging::x86::{Flavor, X86Format};
    use thinhv_paging::{BumpFrames, Leaf};

    #[derive(Default)]
    struct Mem(HashMap<u64, [u64; 512]>);
    impl PhysMem for Mem {
        fn read_entry(&self, t: u64, i: usize) -> u64 {
            self.0.get(&t).map_or(0, |x| x[i])
        }
        fn write_entry(&mut self, t: u64, i: usize, v: u64) {
            self.0.entry(t).or_insert([0; 512])[i] = v;
        }
        fn zero_frame(&mut self, f: u64) {
            self.0.insert(f, [0; 512]);
        }
    }

    const FMT: X86Format = X86Format {
        flavor: Flavor::Nested,
        page_1g: true,
        nx: true,
    };

    fn plan() -> Plan {
        Plan {
            top: 3 * GIB,
            protected: PhysRange::new(0x7e00_0000, 0x30_0000),
            blank: 0x7e10_0000,
            status: PhysRange::new(0x7e30_0000, 0x1_1000),
            apic_page: Some(0xfee0_0000),
        }
    }

    #[test]
    fn the_guest_sees_what_the_design_says() {
        let mut mem = Mem::default();
        let mut frames = BumpFrames::new(0x1_0000_0000_0000 - 0x100_0000, 0x100_0000);
        let root = build(&FMT, &mut mem, &mut frames, &plan()).unwrap();
        let m = Mapper::open(&FMT, &mut mem, root);
        let at = |a: u64| m.translate(a).unwrap();
        // Ordinary memory: identity, writable.
        for a in [0u64, 0x7dff_ffff, 0x7e31_1000, 0xc000_0000, 0xffff_ffff] {
            let l: Leaf = at(a);
            assert_eq!(l.phys + (a - l.virt), a);
            assert!(l.attrs.write, "{a:#x}");
        }
        // The protected region: every page is the blank frame, read-only.
        for a in (0x7e00_0000..0x7e30_0000).step_by(0x1000) {
            let l = at(a);
            assert_eq!(l.phys, 0x7e10_0000);
            assert!(!l.attrs.write && !l.attrs.exec);
        }
        // The status page: itself, read-only.
        let l = at(0x7e30_0800);
        assert_eq!(l.phys, 0x7e30_0000);
        assert!(!l.attrs.write);
        // The APIC page: read-only, uncached.
        assert_eq!(at(0xfee0_0300).attrs, Attrs::MMIO_RO);
        // At least 4 GiB mapped; nothing above.
        assert!(m.translate(4 * GIB - 1).is_some());
        assert!(m.translate(4 * GIB).is_none());
    }

    #[test]
    fn first_touch_maps_one_gib_and_never_the_hypervisor() {
        let mut mem = Mem::default();
        let mut frames = BumpFrames::new(0x1_0000_0000_0000 - 0x100_0000, 0x100_0000);
        let p = plan();
        let root = build(&FMT, &mut mem, &mut frames, &p).unwrap();
        assert!(demand_map(
            &FMT,
            &mut mem,
            &mut frames,
            root,
            0x80_1234_5678,
            40,
            &[p.protected]
        ));
        assert!(!demand_map(
            &FMT,
            &mut mem,
            &mut frames,
            root,
            1 << 40,
            40,
            &[p.protected]
        ));
        let high = PhysRange::new(0x90_0000_0000, 0x1000);
        assert!(!demand_map(
            &FMT,
            &mut mem,
            &mut frames,
            root,
            0x90_0000_5000,
            40,
            &[high]
        ));
        let m = Mapper::open(&FMT, &mut mem, root);
        let l = m.translate(0x80_1234_5678).unwrap();
        assert_eq!(
            (l.virt, l.phys, l.level),
            (0x80_0000_0000, 0x80_0000_0000, 2)
        );
    }
}
