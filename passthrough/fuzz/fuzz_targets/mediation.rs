//! Configuration-space mediation over arbitrary accesses and devices: a
//! hidden function never shows a byte of the device nor lets a write
//! through; a VF budget never shows more than the budget as TotalVFs or
//! InitialVFs, and never lets NumVFs above it reach the device.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinhv_passthrough::mediate::{self, Policy};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let cap = u16::from_le_bytes([data[0], data[1]]) & 0xffc;
    let os_vfs = u16::from_le_bytes([data[2], data[3]]);
    let initial = u16::from_le_bytes([data[4], data[5]]);
    let offset = u16::from_le_bytes([data[6], data[7]]) % 4096;
    let size = [1u8, 2, 4][usize::from(data[8] % 3)];
    if usize::from(offset) + usize::from(size) > 4096 || cap > 4096 - 0x40 {
        return;
    }
    let value = u32::from_le_bytes([data[9], data[10], data[11], data[12]]);
    let device = u32::from_le_bytes([data[12], data[13], data[14], data[15]]);
    let mask = mediate::all_ones(size);
    assert_eq!(mediate::read(&Policy::Hidden, offset, size, || device), mask);
    let w = mediate::write(&Policy::Hidden, offset, size, value, |_| 0);
    assert!(w.forward.is_none());
    let p = Policy::VfBudget {
        cap,
        os_vfs,
        initial_vfs: initial,
    };
    // Read TotalVFs and InitialVFs back as words: never above the budget.
    for reg in [cap + 0x0c, cap + 0x0e] {
        let v = mediate::read(&p, reg, 2, || device & 0xffff);
        assert!(v <= u32::from(os_vfs), "{v} > {os_vfs}");
    }
    let _ = mediate::read(&p, offset, size, || device & mask);
    // A write that reaches the device never leaves NumVFs above the budget.
    let num = u16::from_le_bytes([data[13], data[14]]);
    let w = mediate::write(&p, offset, size, value & mask, |_| num);
    let nreg = cap + 0x10;
    if let Some(fwd) = w.forward {
        let mut after = num.to_le_bytes();
        for i in 0..u16::from(size) {
            let at = offset + i;
            if at == nreg || at == nreg + 1 {
                after[usize::from(at - nreg)] = fwd.to_le_bytes()[usize::from(i)];
            }
        }
        let covers_num = offset <= nreg + 1 && offset + u16::from(size) > nreg;
        if covers_num {
            assert!(u16::from_le_bytes(after) <= os_vfs);
        }
        // VF Enable never goes on above the budget.
        let ctl = cap + 0x08;
        if num > os_vfs && offset <= ctl && offset + u16::from(size) > ctl {
            assert_eq!(fwd.to_le_bytes()[usize::from(ctl - offset)] & 1, 0);
        }
    }
});
