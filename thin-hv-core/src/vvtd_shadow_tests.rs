use super::*;
use crate::test_mem::{OsRam, Tables};
use thinhv_passthrough::vvtd::{Denied, Effects, Offer, Unit, reg};

/// Frames at 0x1_0000_0000 and up, at most `left` of them.
struct Frames {
    next: u64,
    left: u32,
    freed: Vec<u64>,
}

impl Frames {
    fn new(left: u32) -> Self {
        Self {
            next: 0x1_0000_0000,
            left,
            freed: Vec::new(),
        }
    }
}

impl FrameAlloc for Frames {
    fn alloc_frame(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.next += 0x1000;
        Some(self.next)
    }
}

impl FreeFrames for Frames {
    fn free_frame(&mut self, frame: u64) {
        self.freed.push(frame);
    }
}

/// The OS may reach its RAM except 0x9_0000..0xA_0000 (thinhv's) and
/// 0xA_0000..0xB_0000 (an appliance's).
struct OsReach;

impl DmaReach for OsReach {
    fn os_may_dma(&self, gpa: u64) -> bool {
        gpa < 0x9_0000 || (0xb_0000..0x10_0000).contains(&gpa)
    }
}

/// The control: a reach that refuses nothing.
struct Everything;

impl DmaReach for Everything {
    fn os_may_dma(&self, _: u64) -> bool {
        true
    }
}

/// A 4-level OS tree at 0x20000 with one leaf table at 0x23000 covering
/// IOVA 0x4000_0000..0x4020_0000; `leaves` are (index, entry).
fn os_tables(leaves: &[(u64, u64)]) -> OsRam {
    let mut ram = OsRam(vec![0; 0x10_0000]);
    ram.put(0x20000, 0x21003);
    ram.put(0x21000 + 8, 0x22003);
    ram.put(0x22000, 0x23003);
    for &(i, e) in leaves {
        ram.put(0x23000 + i * 8, e);
    }
    ram
}

const TABLES: OsTables = OsTables {
    root: 0x20000,
    levels: 4,
};
const BASE: u64 = 0x4000_0000;

/// A unit with translation on (the walk needs nothing else).
fn unit(ram: &mut OsRam) -> Unit {
    let mut u = Unit::new(Offer {
        host_width: 46,
        remapping: true,
        x2apic: true,
    });
    let mut fx = Effects::default();
    u.write(reg::GCMD, 4, 1 << 31, ram, &mut fx);
    u
}

struct World {
    os: OsRam,
    unit: Unit,
    pt: Tables,
    frames: Frames,
    shadow: Shadow<Vtd>,
}

impl World {
    fn new(leaves: &[(u64, u64)]) -> Self {
        let mut os = os_tables(leaves);
        let unit = unit(&mut os);
        let mut pt = Tables::default();
        let mut frames = Frames::new(64);
        let shadow = Shadow::new(Vtd, 5, &mut pt, &mut frames).unwrap();
        Self {
            os,
            unit,
            pt,
            frames,
            shadow,
        }
    }
    fn sync(&mut self, reach: &impl DmaReach, from: u64, to: u64) -> Synced {
        self.shadow
            .sync(
                &self.unit,
                &self.os,
                TABLES,
                reach,
                &mut self.pt,
                &mut self.frames,
                from,
                to,
                1 << 20,
            )
            .unwrap()
    }
    fn entry(&self, iova: u64) -> u64 {
        self.shadow.entry(&self.pt, iova)
    }
}

#[test]
fn the_shadow_maps_what_the_os_maps_with_exactly_its_rights() {
    let mut w = World::new(&[(0, 0x30003), (1, 0x31001), (2, 0x32002)]);
    let s = w.sync(&OsReach, 0, u64::MAX);
    assert_eq!((s.mapped, s.unmapped, s.refused, s.resume), (3, 0, 0, None));
    assert_eq!(w.entry(BASE), 0x30003);
    assert_eq!(w.entry(BASE + 0x1000), 0x31001, "read-only");
    assert_eq!(
        w.entry(BASE + 0x2000),
        0x32002,
        "write-only, as Linux maps a buffer a device fills"
    );
    assert_eq!(w.entry(BASE + 0x3000), 0);
    assert_eq!(w.shadow.pages, 3);
    // Nothing changed: a second sync writes nothing.
    assert_eq!(w.sync(&OsReach, 0, u64::MAX), Synced::default());
}

#[test]
fn thinhvs_and_an_appliances_memory_never_enter_a_shadow_whatever_the_os_maps() {
    // The OS maps thinhv's page 0x9_0000 and the appliance's 0xA_5000, as
    // well as its own 0x3_0000.
    let leaves = [(0, 0x30003), (1, 0x9_0003), (2, 0xa_5003)];
    let mut w = World::new(&leaves);
    let s = w.sync(&OsReach, 0, u64::MAX);
    assert_eq!((s.mapped, s.refused), (1, 2));
    assert_eq!(w.entry(BASE + 0x1000), 0);
    assert_eq!(w.entry(BASE + 0x2000), 0);
    // The control: the same tables with nothing refused map them; the
    // reach check is what keeps them out.
    let mut control = World::new(&leaves);
    let s = control.sync(&Everything, 0, u64::MAX);
    assert_eq!((s.mapped, s.refused), (3, 0));
    assert_eq!(control.entry(BASE + 0x1000), 0x9_0003);
    // A mapping the OS moves onto thinhv's page leaves the shadow at the
    // next invalidation.
    w.os.put(0x23000, 0x9_1003);
    let s = w.sync(&OsReach, BASE, BASE + 0x1000);
    assert_eq!((s.unmapped, s.refused), (1, 1));
    assert_eq!(w.entry(BASE), 0);
}

#[test]
fn the_oss_changes_reach_the_shadow_at_its_invalidation_and_only_there() {
    let mut w = World::new(&[(0, 0x30003), (1, 0x31003)]);
    w.sync(&OsReach, 0, u64::MAX);
    // The OS unmaps page 1 and remaps page 0 elsewhere, read-only.
    w.os.put(0x23000 + 8, 0);
    w.os.put(0x23000, 0x33001);
    // Before its invalidation the device still sees the old mapping (as
    // through a real IOTLB).
    assert_eq!(w.entry(BASE + 0x1000), 0x31003);
    // A page-selective invalidation of another page changes nothing.
    assert_eq!(
        w.sync(&OsReach, BASE + 0x5000, BASE + 0x6000),
        Synced::default()
    );
    // Page 1's: gone. Page 0's: moved, with the new rights.
    let s = w.sync(&OsReach, BASE + 0x1000, BASE + 0x2000);
    assert_eq!((s.mapped, s.unmapped), (0, 1));
    assert_eq!(w.entry(BASE + 0x1000), 0);
    assert_eq!(w.entry(BASE), 0x30003);
    let s = w.sync(&OsReach, BASE, BASE + 0x1000);
    assert_eq!((s.mapped, s.unmapped), (1, 0));
    assert_eq!(w.entry(BASE), 0x33001);
    assert_eq!(w.shadow.pages, 1);
}

#[test]
fn a_sync_within_its_budget_resumes_where_it_stopped() {
    let leaves: Vec<(u64, u64)> = (0..10).map(|i| (i * 3, 0x30003 + i * 0x1000)).collect();
    let mut w = World::new(&leaves);
    let mut from = 0;
    let mut rounds = 0;
    loop {
        let s = w
            .shadow
            .sync(
                &w.unit,
                &w.os,
                TABLES,
                &OsReach,
                &mut w.pt,
                &mut w.frames,
                from,
                u64::MAX,
                64,
            )
            .unwrap();
        rounds += 1;
        match s.resume {
            Some(r) => {
                assert!(r > from);
                from = r;
            }
            None => break,
        }
    }
    // Budgets count the entries read: many rounds, each moving on.
    assert!(rounds > 10, "{rounds} rounds");
    assert_eq!(w.shadow.pages, 10);
    for (i, e) in leaves {
        assert_eq!(w.entry(BASE + i * 0x1000), e);
    }
}

#[test]
fn a_shadow_out_of_frames_leaves_the_page_out_and_gives_every_frame_back() {
    let mut os = os_tables(&[(0, 0x30003)]);
    let unit = unit(&mut os);
    let mut pt = Tables::default();
    // The root and two more tables: a leaf needs three below the root.
    let mut frames = Frames::new(3);
    let mut shadow = Shadow::new(Vtd, 1, &mut pt, &mut frames).unwrap();
    let r = shadow.sync(
        &unit,
        &os,
        TABLES,
        &OsReach,
        &mut pt,
        &mut frames,
        0,
        u64::MAX,
        100,
    );
    assert_eq!(r, Err(ShadowError::OutOfFrames));
    assert_eq!(shadow.entry(&pt, BASE), 0);
    // More frames, from elsewhere.
    let mut frames2 = Frames::new(8);
    frames2.next = 0x2_0000_0000;
    let r = shadow.sync(
        &unit,
        &os,
        TABLES,
        &OsReach,
        &mut pt,
        &mut frames2,
        0,
        u64::MAX,
        100,
    );
    assert!(r.is_ok());
    assert_eq!(shadow.entry(&pt, BASE), 0x30003);
    let tables = shadow.tables;
    assert_eq!(tables, 4);
    let mut back = Frames::new(0);
    shadow.free(&pt, &mut back);
    assert_eq!(back.freed.len() as u64, tables);
}

/// thinhv's shadow tables as the real unit reads them.
struct AmdTables<'a>(&'a Tables);

impl OsMemory for AmdTables<'_> {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        if out.len() != 8 || !gpa.is_multiple_of(8) {
            return Err(Denied);
        }
        let e = self
            .0
            .read_entry(gpa & !0xfff, ((gpa & 0xfff) / 8) as usize);
        out.copy_from_slice(&e.to_le_bytes());
        Ok(())
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), Denied> {
        Err(Denied)
    }
}

/// An AMD-Vi unit, on, with the OS's 3-level I/O page tables at 0x20000:
/// a 2 MiB page at IOVA 0 onto 0x0 (over thinhv's 0x9_0000..0xA_0000
/// and the appliance's 0xA_0000..0xB_0000), and at IOVA 0x4000_0000 a
/// 64 KiB page (NextLevel 7) onto 0xC_0000, read-only.
fn amd_world() -> (OsRam, thinhv_passthrough::vamdvi::Unit) {
    use thinhv_passthrough::vamdvi::{self, ctrl};
    let mut os = OsRam(vec![0; 0x10_0000]);
    let pde = |next: u64, level: u64| next | 1 | (level << 9) | (3 << 61);
    os.put(0x20000, pde(0x21000, 2));
    os.put(0x20000 + 8, pde(0x22000, 2));
    os.put(0x21000, 1 | (3 << 61)); // 2 MiB at 0, NextLevel 0
    os.put(0x22000, pde(0x23000, 1));
    for i in 0..16 {
        os.put(0x23000 + i * 8, 0xc_7000 | 1 | (7 << 9) | (1 << 61));
    }
    let mut u = vamdvi::Unit::new(vamdvi::Offer {
        host_width: 46,
        x2apic: false,
    });
    let mut fx = vamdvi::Effects::default();
    u.write(vamdvi::reg::CONTROL, 8, ctrl::IOMMU_EN, &mut os, &mut fx);
    (os, u)
}

#[test]
fn an_amd_vi_shadow_splits_large_pages_and_keeps_thinhvs_pages_out_of_them() {
    let (os, unit) = amd_world();
    let mut pt = Tables::default();
    let mut frames = Frames::new(64);
    let mut shadow = Shadow::new(AmdVi, 2, &mut pt, &mut frames).unwrap();
    let tables = OsTables {
        root: 0x20000,
        levels: 3,
    };
    let s = shadow
        .sync(
            &unit,
            &os,
            tables,
            &OsReach,
            &mut pt,
            &mut frames,
            0,
            u64::MAX,
            1 << 20,
        )
        .unwrap();
    // Of the 2 MiB page, the OS may reach the pages below 1 MiB less 32
    // (thinhv's 16, the appliance's 16): 224; the 256 above 1 MiB are not
    // its RAM. And the 64 KiB page's 16.
    assert_eq!((s.mapped, s.refused, s.resume), (224 + 16, 32 + 256, None));
    let leaf = |iova| shadow.entry(&pt, iova);
    let amd = |page: u64, w: bool| page | 1 | (1 << 61) | (u64::from(w) << 62);
    assert_eq!(leaf(0x8_f000), amd(0x8_f000, true));
    assert_eq!(
        leaf(0x9_0000),
        0,
        "thinhv's page inside the OS's 2 MiB page"
    );
    assert_eq!(leaf(0xa_f000), 0, "the appliance's");
    assert_eq!(leaf(0xb_0000), amd(0xb_0000, true));
    assert_eq!(leaf(0x4000_0000), amd(0xc_0000, false));
    assert_eq!(leaf(0x4000_f000), amd(0xc_f000, false));
    assert_eq!(leaf(0x4001_0000), 0);
    // The real unit's view: the shadow walked as AMD-Vi walks a 4-level
    // tree (the model's walk) gives each page the shadow holds, and
    // nothing where it holds none, so no table of the shadow's is ever
    // taken for a page.
    let real = AmdTables(&pt);
    let walker = amd_world().1;
    for iova in (0..0x20_0000)
        .step_by(0x1000)
        .chain((0x4000_0000..0x4001_1000).step_by(0x1000))
    {
        let want = shadow.entry(&pt, iova);
        let got = walker.walk(&real, shadow.root(), 4, iova).unwrap();
        match got {
            None => assert_eq!(want, 0, "{iova:#x}"),
            Some(p) => {
                assert_eq!(p.gpa, want & 0x000f_ffff_ffff_f000, "{iova:#x}");
                assert!(p.read && p.write == (want >> 62 & 1 != 0), "{iova:#x}");
                assert!(OsReach.os_may_dma(p.gpa), "{iova:#x}: {:#x}", p.gpa);
            }
        }
    }
    // The control: with nothing refused, the whole 2 MiB page is mapped.
    let mut pt2 = Tables::default();
    let mut frames2 = Frames::new(64);
    let mut control = Shadow::new(AmdVi, 2, &mut pt2, &mut frames2).unwrap();
    let s = control
        .sync(
            &unit,
            &os,
            tables,
            &Everything,
            &mut pt2,
            &mut frames2,
            0,
            u64::MAX,
            1 << 20,
        )
        .unwrap();
    assert_eq!((s.mapped, s.refused), (512 + 16, 0));
    assert_eq!(control.entry(&pt2, 0x9_0000), amd(0x9_0000, true));
}
