//! The test harness itself: a run that stops making progress must say where
//! each CPU was, since a hang in CI is otherwise a log cut in the middle.
use std::time::Duration;
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, built};

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn a_run_that_misses_its_marker_reports_each_cpus_rip() {
    let b = built();
    // An empty ESP: the firmware finds nothing to boot and waits.
    let boot = Boot::new(&b, "harness-hang", Profile::svm(2));
    let mut run = boot.start();
    let e = run
        .wait_for("NEVER-PRINTED", Duration::from_secs(20))
        .unwrap_err();
    assert!(e.to_string().contains("NEVER-PRINTED"), "{e}");
    let h = run.hang_report();
    let rips: Vec<&String> = h
        .cpus
        .iter()
        .filter(|l| l.trim_start().starts_with("RIP="))
        .collect();
    assert_eq!(rips.len(), 2, "{}", h.full());
    assert_eq!(
        h.cpus.iter().filter(|l| l.starts_with("CPU#")).count(),
        2,
        "{}",
        h.full()
    );
    let brief = h.brief("harness-hang");
    eprintln!("{brief}");
    assert!(brief.contains("CPU#1"), "{brief}");
    assert!(brief.lines().count() <= 25, "{brief}");
    // The firmware's own output is there as program output.
    assert!(!h.last_lines.is_empty(), "{}", h.full());
}
