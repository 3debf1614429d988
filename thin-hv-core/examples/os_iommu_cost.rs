//! What composing the OS's IOMMU programming costs thinhv, on this host,
//! before any exit cost (`cargo xtask bench --os-iommu-model`; issue 14,
//! `docs/os-iommu.md`): the work behind one map and one unmap of a Linux
//! DMA buffer (a page-selective invalidation), a domain-wide invalidation
//! (Linux's lazy mode) over domains of growing size, one invalidation
//! through the emulated VT-d queue, and the sync of the real table's OS
//! half of remapping entries at a global interrupt-entry invalidation.
//! Each figure is the median of several runs; one line per figure.
// A benchmark: casts of counts to floats for the printout.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
use std::collections::HashMap;
use std::time::Instant;
use thin_hv_core::vvtd_shadow::{DmaReach, OsTables, Shadow, Vtd};
use thinhv_paging::{FrameAlloc, PhysMem};
use thinhv_passthrough::irq_remap::{Cores, Policy};
use thinhv_passthrough::vvtd::{
    self, Denied, Effects, Offer, OsMemory, Scope, Sources, Unit, gsts, reg,
};

/// The OS's RAM: 64 MiB, flat.
struct Ram(Vec<u8>);

impl OsMemory for Ram {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        let a = usize::try_from(gpa).map_err(|_| Denied)?;
        out.copy_from_slice(self.0.get(a..a + out.len()).ok_or(Denied)?);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
        let a = usize::try_from(gpa).map_err(|_| Denied)?;
        self.0
            .get_mut(a..a + data.len())
            .ok_or(Denied)?
            .copy_from_slice(data);
        Ok(())
    }
}

impl Ram {
    fn put(&mut self, gpa: u64, v: u64) {
        let a = gpa as usize;
        self.0[a..a + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// thinhv's shadow tables.
#[derive(Default)]
struct Tables(HashMap<u64, Box<[u64; 512]>>);

impl PhysMem for Tables {
    fn read_entry(&self, t: u64, i: usize) -> u64 {
        self.0.get(&t).map_or(0, |t| t[i])
    }
    fn write_entry(&mut self, t: u64, i: usize, v: u64) {
        self.0.entry(t).or_insert_with(|| Box::new([0; 512]))[i] = v;
    }
    fn zero_frame(&mut self, f: u64) {
        self.0.insert(f, Box::new([0; 512]));
    }
}

struct Frames(u64);

impl FrameAlloc for Frames {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.0 += 0x1000;
        Some(self.0)
    }
}

struct Everything;

impl DmaReach for Everything {
    fn os_may_dma(&self, gpa: u64) -> bool {
        gpa < 0x100_0000_0000
    }
}

struct OsCores;

impl Cores for OsCores {
    fn has(&self, id: u32) -> bool {
        id < 64
    }
    fn logical(&self, _: u8, _: &mut Vec<u32>) -> bool {
        true
    }
}

struct OsSources;

impl Sources for OsSources {
    fn is_os(&self, _: u16) -> bool {
        true
    }
    fn buses_are_os(&self, _: u8, _: u8) -> bool {
        true
    }
}

const ROOT: u64 = 0x10_0000;
/// IOVAs from here, as Linux's allocator hands them out from the top down.
const IOVA: u64 = 0xff00_0000;

/// A 4-level OS tree mapping `pages` pages from IOVA onto 0x100_0000..,
/// tables from 0x20_0000 on.
fn os_domain(ram: &mut Ram, pages: u64) {
    let mut next = 0x20_0000u64;
    let mut alloc = |ram: &mut Ram| {
        next += 0x1000;
        ram.0[next as usize..next as usize + 0x1000].fill(0);
        next
    };
    ram.0[ROOT as usize..ROOT as usize + 0x1000].fill(0);
    for p in 0..pages {
        let iova = IOVA + p * 0x1000;
        let mut table = ROOT;
        for level in (1..4).rev() {
            let i = (iova >> (12 + 9 * level)) & 0x1ff;
            let at = table + i * 8;
            let e = u64::from_le_bytes(ram.0[at as usize..at as usize + 8].try_into().unwrap());
            table = if e & 3 == 0 {
                let t = alloc(ram);
                ram.put(at, t | 3);
                t
            } else {
                e & !0xfff
            };
        }
        ram.put(
            table + ((iova >> 12) & 0x1ff) * 8,
            (0x100_0000 + p * 0x1000) | 3,
        );
    }
}

fn unit_on(ram: &mut Ram) -> Unit {
    let mut u = Unit::new(Offer {
        host_width: 46,
        remapping: true,
        x2apic: true,
    });
    let mut fx = Effects::default();
    u.write(reg::RTADDR, 8, 0x8000, ram, &mut fx);
    u.write(reg::GCMD, 4, u64::from(gsts::RTPS), ram, &mut fx);
    u.write(reg::GCMD, 4, u64::from(gsts::TES), ram, &mut fx);
    u
}

/// A shadow of the OS's domain at [`ROOT`], with its tables and frames.
struct Dom {
    pt: Tables,
    frames: Frames,
    shadow: Shadow<Vtd>,
}

impl Dom {
    fn new() -> Self {
        let mut pt = Tables::default();
        let mut frames = Frames(0x1_0000_0000);
        let shadow = Shadow::new(Vtd, 1, &mut pt, &mut frames).unwrap();
        Self { pt, frames, shadow }
    }

    /// Syncs `range` with the OS's tables, reading at most `budget`
    /// entries.
    fn sync(&mut self, unit: &Unit, ram: &Ram, range: core::ops::Range<u64>, budget: u64) {
        let tables = OsTables {
            root: ROOT,
            levels: 4,
        };
        self.shadow
            .sync(
                unit,
                ram,
                tables,
                &Everything,
                &mut self.pt,
                &mut self.frames,
                range.start,
                range.end,
                budget,
            )
            .unwrap();
    }
}

/// The real table's OS half synced over `scope` (`None`: all of it).
fn sync_entries(unit: &Unit, ram: &Ram, scope: Option<Scope>) -> vvtd::EntriesSynced {
    vvtd::sync_entries(
        unit,
        ram,
        scope,
        &OsSources,
        &OsCores,
        Policy::default(),
        true,
        &mut |_, e| {
            std::hint::black_box(e);
        },
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<R>(reps: u32, mut f: impl FnMut() -> R) -> f64 {
    let runs = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(f());
            }
            t.elapsed().as_secs_f64() / f64::from(reps)
        })
        .collect();
    median(runs)
}

fn main() {
    let mut ram = Ram(vec![0; 64 << 20]);

    // One map and one unmap of a page, each followed by its
    // page-selective sync, in a domain of 4096 mapped pages.
    os_domain(&mut ram, 4096);
    let unit = unit_on(&mut ram);
    let mut dom = Dom::new();
    dom.sync(&unit, &ram, 0..u64::MAX, u64::MAX);
    let leaf_at = {
        // The OS leaf table entry of the last page.
        let iova = IOVA + 4095 * 0x1000;
        let mut table = ROOT;
        for level in (1..4).rev() {
            let i = (iova >> (12 + 9 * level)) & 0x1ff;
            let at = table + i * 8;
            table = u64::from_le_bytes(ram.0[at as usize..at as usize + 8].try_into().unwrap())
                & !0xfff;
        }
        table + ((iova >> 12) & 0x1ff) * 8
    };
    let iova = IOVA + 4095 * 0x1000;
    let mut mapped = true;
    let per = time(20_000, || {
        mapped = !mapped;
        ram.put(leaf_at, if mapped { 0x200_0000 | 3 } else { 0 });
        dom.sync(&unit, &ram, iova..iova + 0x1000, 64);
    });
    println!(
        "page-selective sync (one map or unmap): {:.0} ns",
        per * 1e9
    );

    // Domain-wide syncs with nothing changed: the cost of a lazy-mode
    // flush over a domain of N mapped pages.
    for pages in [1024u64, 16_384, 131_072] {
        os_domain(&mut ram, pages);
        let mut dom = Dom::new();
        let t = Instant::now();
        dom.sync(&unit, &ram, 0..u64::MAX, u64::MAX);
        let first = t.elapsed().as_secs_f64();
        let again = time(3, || dom.sync(&unit, &ram, 0..u64::MAX, u64::MAX));
        println!(
            "domain-wide sync, {pages} pages: first {:.2} ms, unchanged {:.2} ms ({:.0} ns per page)",
            first * 1e3,
            again * 1e3,
            again * 1e9 / pages as f64
        );
    }

    // One page-selective IOTLB invalidation and a wait through the
    // emulated queue (the register write thinhv handles at each such
    // invalidation, before the shadow sync).
    let mut unit = unit_on(&mut ram);
    let mut fx = Effects::default();
    unit.write(reg::IQA, 8, 0x4000, &mut ram, &mut fx);
    unit.write(
        reg::GCMD,
        4,
        u64::from(gsts::TES | gsts::QIES),
        &mut ram,
        &mut fx,
    );
    let mut tail = 0u64;
    let per = time(100_000, || {
        let d = [0x2 | (3 << 4) | (1 << 16), IOVA];
        ram.put(0x4000 + tail * 16, d[0]);
        ram.put(0x4000 + tail * 16 + 8, d[1]);
        tail = (tail + 1) % 256;
        ram.put(0x4000 + tail * 16, 0x5 | (1 << 5) | (7 << 32));
        ram.put(0x4000 + tail * 16 + 8, 0x3000);
        tail = (tail + 1) % 256;
        let mut fx = Effects::default();
        unit.write(reg::IQT, 8, tail << 4, &mut ram, &mut fx);
        fx
    });
    println!(
        "queued invalidation (IOTLB page + wait): {:.0} ns",
        per * 1e9
    );

    // A global interrupt-entry invalidation: the real table's OS half
    // (32768 entries) composed from an OS table with 256 entries in use.
    unit.write(reg::IRTA, 8, 0x80_0000 | (1 << 11) | 0xf, &mut ram, &mut fx);
    unit.write(
        reg::GCMD,
        4,
        u64::from(gsts::TES | gsts::QIES | gsts::IRTPS),
        &mut ram,
        &mut fx,
    );
    unit.write(
        reg::GCMD,
        4,
        u64::from(gsts::TES | gsts::QIES | gsts::IRES),
        &mut ram,
        &mut fx,
    );
    for i in 0..256u64 {
        ram.put(0x80_0000 + i * 16, 1 | (0x30 << 16) | ((i % 64) << 32));
        ram.put(0x80_0000 + i * 16 + 8, 0x10 | (1 << 18));
    }
    let per = time(5, || sync_entries(&unit, &ram, None));
    println!(
        "global interrupt-entry sync (32768 entries, 256 in use): {:.2} ms",
        per * 1e3
    );
    let per = time(100_000, || {
        sync_entries(&unit, &ram, Some(Scope::Entries { index: 7, order: 0 }))
    });
    println!(
        "index-selective interrupt-entry sync (one entry): {:.0} ns",
        per * 1e9
    );
}
