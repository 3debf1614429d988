//! The parsers against damaged tables: thousands of deterministic mutations
//! of the tables QEMU's IOMMUs present (bytes flipped, lengths changed,
//! truncated, checksum repaired so the parsers look past it). None may
//! panic or loop; this runs in every test run on stable Rust, beside the
//! `cargo fuzz` targets in `passthrough/fuzz` (nightly, run by hand).
use thinhv_passthrough::pci::{Bdf, ConfigSpace, extended_caps, legacy_caps};
use thinhv_passthrough::{acpi, dmar, ivrs};

const TABLES: [&[u8]; 4] = [
    include_bytes!("data/qemu-q35-intel-iommu.dmar"),
    include_bytes!("data/qemu-q35-intel-iommu-intremap-rootport.dmar"),
    include_bytes!("data/qemu-q35-amd-iommu.ivrs"),
    include_bytes!("data/qemu-q35-amd-iommu-rootport.ivrs"),
];

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }
}

fn mutate(rng: &mut Rng, t: &[u8]) -> Vec<u8> {
    let mut m = t.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 => {
                let i = rng.below(m.len());
                m[i] = rng.next().to_le_bytes()[0];
            }
            1 => {
                // Small lengths are where parsers go wrong.
                let i = rng.below(m.len());
                m[i] = [0, 1, 2, 3, 4, 6, 7, 8, 0xff][rng.below(9)];
            }
            2 => {
                let n = rng.below(m.len());
                m.truncate(n.max(1));
            }
            3 => {
                let extra = rng.below(64);
                m.extend((0..extra).map(|_| rng.next().to_le_bytes()[0]));
            }
            _ => {
                let i = rng.below(m.len());
                let j = rng.below(m.len());
                m.swap(i, j);
            }
        }
    }
    // Keep the declared length honest half of the time, and the checksum
    // valid, so the structure walk is what gets exercised.
    if m.len() >= 10 && rng.below(2) == 0 {
        let n = u32::try_from(m.len()).unwrap();
        m[4..8].copy_from_slice(&n.to_le_bytes());
    }
    acpi::set_checksum(&mut m);
    m
}

#[test]
fn damaged_dmar_and_ivrs_never_panic() {
    let mut rng = Rng(0x7468_696e_6876_0001);
    let (mut ok, mut refused) = (0u32, 0u32);
    for t in TABLES {
        for _ in 0..20_000 {
            let m = mutate(&mut rng, t);
            let r1 = dmar::parse(&m).map(|_| ());
            let r2 = ivrs::parse(&m).map(|_| ());
            if r1.is_ok() || r2.is_ok() {
                ok += 1;
            } else {
                refused += 1;
            }
        }
    }
    // Both outcomes must occur, or the mutations test nothing.
    assert!(ok > 1000 && refused > 1000, "ok {ok}, refused {refused}");
}

/// Configuration space from raw bytes (one function).
struct Bytes(Vec<u8>);

impl ConfigSpace for Bytes {
    fn read32(&self, _bdf: Bdf, offset: u16) -> u32 {
        let o = usize::from(offset);
        self.0
            .get(o..o + 4)
            .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[test]
fn random_capability_lists_end() {
    let mut rng = Rng(0x6361_7073_0000_0002);
    for _ in 0..2_000 {
        let mut cs: Vec<u8> = (0..4096).map(|_| rng.next().to_le_bytes()[0]).collect();
        cs[6] |= 0x10; // capabilities list present
        let bdf = Bdf::new(0, 0, 0, 0);
        let c = Bytes(cs);
        assert!(legacy_caps(&c, bdf).len() <= 48);
        assert!(extended_caps(&c, bdf).len() <= (4096 - 256) / 4);
    }
}
