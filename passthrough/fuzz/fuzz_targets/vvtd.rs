//! The VT-d unit thinhv emulates for the OS, over arbitrary register
//! programming, descriptors and table memory: never a panic, and the
//! invariants `vvtd::fuzz::run` checks after every step hold (status shows
//! only what is offered, the queue head stays in the queue, the unit writes
//! OS memory only as a wait's status dword).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinhv_passthrough::vvtd::fuzz::run(data);
});
