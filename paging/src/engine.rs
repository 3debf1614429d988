//! The table walker and builder shared by every entry format.
use crate::{
    Attrs, ENTRIES, EntryFormat, FrameAlloc, LEVELS, PAGE_SIZE, PhysMem, level_index, level_size,
};

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// An address or length is not 4 KiB-aligned.
    Unaligned,
    /// The range wraps or leaves the 48-bit space of 4-level tables.
    OutOfRange,
    /// The frame allocator is exhausted.
    OutOfFrames,
}

/// A leaf found by [`Mapper::translate`] or [`Mapper::for_each_leaf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First input address the leaf maps.
    pub virt: u64,
    /// First output address.
    pub phys: u64,
    /// Level of the leaf (0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB).
    pub level: usize,
    /// Its attributes.
    pub attrs: Attrs,
}

impl Leaf {
    /// Bytes mapped.
    pub const fn size(&self) -> u64 {
        level_size(self.level)
    }
}

/// Highest input address + 1 of 4-level tables.
const INPUT_LIMIT: u64 = 1 << 48;

/// Builds and walks one table tree rooted at `root`.
pub struct Mapper<'a, F: EntryFormat, M: PhysMem> {
    fmt: &'a F,
    mem: &'a mut M,
    root: u64,
}

impl<'a, F: EntryFormat, M: PhysMem> Mapper<'a, F, M> {
    /// Creates a new empty root table.
    pub fn create(
        fmt: &'a F,
        mem: &'a mut M,
        alloc: &mut impl FrameAlloc,
    ) -> Result<Self, MapError> {
        let root = alloc.alloc_frame().ok_or(MapError::OutOfFrames)?;
        mem.zero_frame(root);
        Ok(Self { fmt, mem, root })
    }

    /// Works on an existing tree.
    pub fn open(fmt: &'a F, mem: &'a mut M, root: u64) -> Self {
        Self { fmt, mem, root }
    }

    /// Physical address of the root table.
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// Maps `[virt, virt + len)` to `[phys, phys + len)` with `attrs`, using
    /// the largest pages alignment and length allow, splitting large pages
    /// that are already there when a part of them changes.
    pub fn map(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        attrs: Attrs,
        alloc: &mut impl FrameAlloc,
    ) -> Result<(), MapError> {
        if !virt.is_multiple_of(PAGE_SIZE)
            || !phys.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
        {
            return Err(MapError::Unaligned);
        }
        let end = virt.checked_add(len).ok_or(MapError::OutOfRange)?;
        if end > INPUT_LIMIT || phys.checked_add(len).is_none() {
            return Err(MapError::OutOfRange);
        }
        let mut v = virt;
        let mut p = phys;
        while v < end {
            let level = self.pick_level(v, p, end - v);
            self.map_at(self.root, LEVELS - 1, v, p, level, attrs, alloc)?;
            v += level_size(level);
            p += level_size(level);
        }
        Ok(())
    }

    /// Maps every 4 KiB page of `[virt, virt + len)` to the single frame
    /// `frame` (used to give the guest one blank page for a whole hole).
    pub fn map_all_to_frame(
        &mut self,
        virt: u64,
        len: u64,
        frame: u64,
        attrs: Attrs,
        alloc: &mut impl FrameAlloc,
    ) -> Result<(), MapError> {
        if !virt.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || !frame.is_multiple_of(PAGE_SIZE)
        {
            return Err(MapError::Unaligned);
        }
        let end = virt.checked_add(len).ok_or(MapError::OutOfRange)?;
        if end > INPUT_LIMIT {
            return Err(MapError::OutOfRange);
        }
        let mut v = virt;
        while v < end {
            self.map_at(self.root, LEVELS - 1, v, frame, 0, attrs, alloc)?;
            v += PAGE_SIZE;
        }
        Ok(())
    }

    /// Makes the 4 KiB page at `virt` not present (any access faults),
    /// splitting a large page around it and keeping the rest of it.
    pub fn unmap_page(&mut self, virt: u64, alloc: &mut impl FrameAlloc) -> Result<(), MapError> {
        if !virt.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::Unaligned);
        }
        if virt >= INPUT_LIMIT {
            return Err(MapError::OutOfRange);
        }
        let mut table = self.root;
        for level in (1..LEVELS).rev() {
            let idx = level_index(virt, level);
            let entry = self.mem.read_entry(table, idx);
            if !self.fmt.is_present(entry) {
                // Nothing mapped here: already absent.
                return Ok(());
            }
            table = if self.fmt.is_leaf(entry, level) {
                self.split(table, idx, entry, level, alloc)?
            } else {
                self.fmt.address(entry, level)
            };
        }
        self.mem.write_entry(table, level_index(virt, 0), 0);
        Ok(())
    }

    /// Replaces the large leaf `entry` (entry `idx` of `table`, at
    /// `level`) with a table of the next level mapping the same range with
    /// the same attributes; returns the new table.
    fn split(
        &mut self,
        table: u64,
        idx: usize,
        entry: u64,
        level: usize,
        alloc: &mut impl FrameAlloc,
    ) -> Result<u64, MapError> {
        let t = alloc.alloc_frame().ok_or(MapError::OutOfFrames)?;
        self.mem.zero_frame(t);
        let base = self.fmt.address(entry, level);
        let a = self.fmt.leaf_attrs(entry, level);
        let step = level_size(level - 1);
        for i in 0..ENTRIES {
            self.mem
                .write_entry(t, i, self.fmt.leaf(base + i as u64 * step, level - 1, a));
        }
        self.mem.write_entry(table, idx, self.fmt.table(t, level));
        Ok(t)
    }

    fn pick_level(&self, v: u64, p: u64, remaining: u64) -> usize {
        let mut level = self.fmt.max_leaf_level().min(LEVELS - 2);
        loop {
            let size = level_size(level);
            if level == 0 || (v.is_multiple_of(size) && p.is_multiple_of(size) && remaining >= size)
            {
                return level;
            }
            level -= 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn map_at(
        &mut self,
        table: u64,
        level: usize,
        v: u64,
        p: u64,
        leaf_level: usize,
        attrs: Attrs,
        alloc: &mut impl FrameAlloc,
    ) -> Result<(), MapError> {
        let idx = level_index(v, level);
        let entry = self.mem.read_entry(table, idx);
        if level == leaf_level {
            if level > 0 && self.fmt.is_present(entry) && !self.fmt.is_leaf(entry, level) {
                // A finer-grained subtree is already here: keep it and map
                // into it one level down.
                let sub = self.fmt.address(entry, level);
                let step = level_size(level - 1);
                for i in 0..ENTRIES as u64 {
                    self.map_at(
                        sub,
                        level - 1,
                        v + i * step,
                        p + i * step,
                        level - 1,
                        attrs,
                        alloc,
                    )?;
                }
                return Ok(());
            }
            self.mem
                .write_entry(table, idx, self.fmt.leaf(p, level, attrs));
            return Ok(());
        }
        let next = if !self.fmt.is_present(entry) {
            let t = alloc.alloc_frame().ok_or(MapError::OutOfFrames)?;
            self.mem.zero_frame(t);
            self.mem.write_entry(table, idx, self.fmt.table(t, level));
            t
        } else if self.fmt.is_leaf(entry, level) {
            self.split(table, idx, entry, level, alloc)?
        } else {
            self.fmt.address(entry, level)
        };
        self.map_at(next, level - 1, v, p, leaf_level, attrs, alloc)
    }

    /// Looks up the leaf that maps `virt`.
    pub fn translate(&self, virt: u64) -> Option<Leaf> {
        if virt >= INPUT_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in (0..LEVELS).rev() {
            let e = self.mem.read_entry(table, level_index(virt, level));
            if !self.fmt.is_present(e) {
                return None;
            }
            if self.fmt.is_leaf(e, level) {
                return Some(Leaf {
                    virt: virt & !(level_size(level) - 1),
                    phys: self.fmt.address(e, level),
                    level,
                    attrs: self.fmt.leaf_attrs(e, level),
                });
            }
            table = self.fmt.address(e, level);
        }
        None
    }

    /// Calls `f` for every leaf, in address order.
    pub fn for_each_leaf(&self, f: &mut impl FnMut(Leaf)) {
        self.walk(self.root, LEVELS - 1, 0, f);
    }

    fn walk(&self, table: u64, level: usize, base: u64, f: &mut impl FnMut(Leaf)) {
        for i in 0..ENTRIES {
            let e = self.mem.read_entry(table, i);
            if !self.fmt.is_present(e) {
                continue;
            }
            let v = base + i as u64 * level_size(level);
            if self.fmt.is_leaf(e, level) {
                f(Leaf {
                    virt: v,
                    phys: self.fmt.address(e, level),
                    level,
                    attrs: self.fmt.leaf_attrs(e, level),
                });
            } else {
                self.walk(self.fmt.address(e, level), level - 1, v, f);
            }
        }
    }
}
