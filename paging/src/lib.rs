//! One page-table engine for every table thinhv builds: the core's own
//! (host) page tables, AMD nested page tables (NPT), and later Intel EPT and
//! the IOMMUs' second-level tables.
//!
//! The engine ([`Mapper`]) knows the radix-tree shape (4 levels of 512
//! entries) and how to choose page sizes, split large pages and walk; an
//! [`EntryFormat`] knows the bits of one kind of entry. Memory is reached only
//! through [`PhysMem`] and new tables come from a [`FrameAlloc`], so the whole
//! crate runs on the host against a fake memory in tests.
//!
//! Levels are numbered from the leaf: level 0 maps 4 KiB, level 1 2 MiB,
//! level 2 1 GiB, level 3 (the root, PML4) 512 GiB per entry.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

mod engine;
pub mod ept;
pub mod iommu;
pub mod x86;

pub use engine::{Leaf, MapError, Mapper};

/// Size of a page and of a table.
pub const PAGE_SIZE: u64 = 4096;
/// Entries per table.
pub const ENTRIES: usize = 512;
/// Number of levels (4-level paging).
pub const LEVELS: usize = 4;

/// Bytes mapped by one entry at `level`.
pub const fn level_size(level: usize) -> u64 {
    1u64 << (12 + 9 * level)
}

/// Index of `addr` in the table at `level`.
pub const fn level_index(addr: u64, level: usize) -> usize {
    ((addr >> (12 + 9 * level)) & 0x1ff) as usize
}

/// Memory type of a mapping, as the IA32_PAT / MTRR encodings name them
/// (Intel SDM Vol. 3A, Table 12-10). A newtype: hardware may report values
/// this crate does not name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemType(pub u8);

impl MemType {
    /// Uncacheable.
    pub const UC: Self = Self(0);
    /// Write-combining.
    pub const WC: Self = Self(1);
    /// Write-through.
    pub const WT: Self = Self(4);
    /// Write-protected.
    pub const WP: Self = Self(5);
    /// Write-back.
    pub const WB: Self = Self(6);
}

/// Access rights and memory type of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attrs {
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Memory type.
    pub mem_type: MemType,
}

impl Attrs {
    /// Read, write, execute, write-back.
    pub const RWX: Self = Self {
        write: true,
        exec: true,
        mem_type: MemType::WB,
    };
    /// Read-only, no execute, write-back.
    pub const RO: Self = Self {
        write: false,
        exec: false,
        mem_type: MemType::WB,
    };
    /// Read and write, no execute, uncacheable (device registers).
    pub const MMIO_RW: Self = Self {
        write: true,
        exec: false,
        mem_type: MemType::UC,
    };
    /// Read-only, no execute, uncacheable.
    pub const MMIO_RO: Self = Self {
        write: false,
        exec: false,
        mem_type: MemType::UC,
    };
}

/// Access to the physical memory that holds page tables.
pub trait PhysMem {
    /// Reads entry `index` of the table at physical address `table`.
    fn read_entry(&self, table: u64, index: usize) -> u64;
    /// Writes entry `index` of the table at physical address `table`.
    fn write_entry(&mut self, table: u64, index: usize, value: u64);
    /// Fills the 4 KiB frame at `frame` with zeros.
    fn zero_frame(&mut self, frame: u64);
}

/// Source of 4 KiB frames for new tables.
pub trait FrameAlloc {
    /// A free, 4 KiB-aligned frame, or `None` when exhausted. The engine
    /// zeroes it.
    fn alloc_frame(&mut self) -> Option<u64>;
}

/// The bits of one kind of page-table entry.
pub trait EntryFormat {
    /// Highest level at which a leaf (large page) may be written: 0 (4 KiB
    /// only), 1 (2 MiB) or 2 (1 GiB).
    fn max_leaf_level(&self) -> usize;
    /// Whether the entry maps anything.
    fn is_present(&self, entry: u64) -> bool;
    /// Whether a present entry at `level` is a leaf (level 0 always is).
    fn is_leaf(&self, entry: u64, level: usize) -> bool;
    /// Physical address the entry points to (table or page).
    fn address(&self, entry: u64, level: usize) -> u64;
    /// An entry at `level` (1..=3) pointing to a table of level
    /// `level - 1`.
    fn table(&self, table: u64, level: usize) -> u64;
    /// A leaf entry mapping `phys` at `level`.
    fn leaf(&self, phys: u64, level: usize, attrs: Attrs) -> u64;
    /// The attributes of a present leaf.
    fn leaf_attrs(&self, entry: u64, level: usize) -> Attrs;
}

/// A frame allocator over a contiguous range, handing out frames in order.
#[derive(Debug, Clone)]
pub struct BumpFrames {
    next: u64,
    end: u64,
    used: u64,
}

impl BumpFrames {
    /// Frames from `[base, base + size)`; `base` is rounded up to 4 KiB.
    pub const fn new(base: u64, size: u64) -> Self {
        let start = (base + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = base + size;
        Self {
            next: start,
            end,
            used: 0,
        }
    }

    /// Frames handed out so far.
    pub const fn used(&self) -> u64 {
        self.used
    }

    /// Frames still available.
    pub const fn remaining(&self) -> u64 {
        if self.end > self.next {
            (self.end - self.next) / PAGE_SIZE
        } else {
            0
        }
    }
}

impl FrameAlloc for BumpFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        if self.next.checked_add(PAGE_SIZE)? > self.end {
            return None;
        }
        let f = self.next;
        self.next += PAGE_SIZE;
        self.used += 1;
        Some(f)
    }
}

#[cfg(test)]
pub(crate) mod fake;
