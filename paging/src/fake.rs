//! A fake physical memory that records every write, for tests.
use crate::{ENTRIES, PhysMem};
use std::collections::HashMap;

#[derive(Default)]
pub struct FakeMem {
    pub tables: HashMap<u64, Box<[u64; ENTRIES]>>,
    pub writes: usize,
}

impl PhysMem for FakeMem {
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        assert_eq!(table % 4096, 0, "unaligned table {table:#x}");
        self.tables.get(&table).map_or(0, |t| t[index])
    }
    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        assert_eq!(table % 4096, 0, "unaligned table {table:#x}");
        self.writes += 1;
        self.tables
            .entry(table)
            .or_insert_with(|| Box::new([0; ENTRIES]))[index] = value;
    }
    fn zero_frame(&mut self, frame: u64) {
        self.tables.insert(frame, Box::new([0; ENTRIES]));
    }
}
