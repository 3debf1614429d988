//! The AMD-Vi unit thinhv emulates for the OS, over arbitrary register
//! programming, commands and table memory: never a panic, and the
//! invariants `vamdvi::fuzz::run` checks after every step hold (control and
//! status show only what is offered, the rings' pointers stay in their
//! rings, the unit writes OS memory only as completion stores and events).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinhv_passthrough::vamdvi::fuzz::run(data);
});
