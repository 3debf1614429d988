//! `thinhv appliances [--json]`, `thinhv appliance console NAME` and
//! `thinhv appliance stop|start|restart NAME`: the appliance partitions
//! as the status page shows them, an appliance's console lines from
//! thinhv's log (`console = "log"`), and the OS's control of them through
//! the status area's doorbell (`docs/appliances.md`).
use crate::cpuid::presence;
use crate::devmem;
use crate::report::page_or_exit;
use serde_json::json;
use std::process::ExitCode;
use thinhv_abi::handoff::partition_flags;
use thinhv_abi::hypercall::Status;
use thinhv_abi::status::{
    ApplianceRecord, ControlCommand, ControlOp, ControlResult, appliance_state_name, control_offset,
};
use zerocopy::FromBytes;

fn text(b: &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// Seconds since its kernel last started, from the TSC.
#[allow(clippy::cast_precision_loss)] // seconds for display
fn uptime(r: &ApplianceRecord, now_tsc: u64) -> Option<f64> {
    (r.started_tsc != 0 && r.tsc_khz != 0 && r.state == 3)
        .then(|| now_tsc.saturating_sub(r.started_tsc) as f64 / (r.tsc_khz as f64 * 1000.0))
}

/// The console lines of appliance `name` in `log`.
pub fn console_lines<'a>(log: &'a str, name: &str) -> Vec<&'a str> {
    let tag = format!("[{name}] ");
    log.lines()
        .filter_map(|l| l.find(&tag).map(|i| &l[i + tag.len()..]))
        .collect()
}

/// Exits its processors made, from their CPU records.
pub fn exits(r: &ApplianceRecord, cpus: &[thinhv_abi::status::CpuRecord]) -> u64 {
    cpus.iter()
        .enumerate()
        .filter(|(i, _)| *i < 64 && r.cpu_mask & (1 << i) != 0)
        .map(|(_, c)| c.exits.iter().sum::<u64>())
        .sum()
}

/// One appliance as JSON (`exits`: [`exits`]).
pub fn record_json(r: &ApplianceRecord, now_tsc: u64, log: &str, exits: u64) -> serde_json::Value {
    let name = text(&r.name);
    let lines = console_lines(log, &name);
    json!({
        "exits": exits,
        "tsc": now_tsc,
        "tsc_khz": r.tsc_khz,
        "cpu_mask": r.cpu_mask,
        "name": name,
        "state": appliance_state_name(r.state),
        "cpus": r.cpu_count,
        "first_apic_id": r.first_apic_id,
        "memory_mib": r.ram_size >> 20,
        "ram_base": r.ram_base,
        "uptime_seconds": uptime(r, now_tsc),
        "restarts": r.restarts,
        "crashes": r.crashes,
        "last_stop_reason": text(&r.reason),
        "on_crash": if r.flags & u32::from(partition_flags::RESTART_ON_CRASH) != 0 { "restart" } else { "stop" },
        "control": if r.flags & u32::from(partition_flags::OS_CONTROL) != 0 { "os" } else { "none" },
        "apic": if r.flags & thinhv_abi::status::APPLIANCE_IN_X2APIC != 0 { "x2apic" } else { "xapic" },
        "console": if r.console_port == 0 { "log".to_string() } else { format!("{:#x}", r.console_port) },
        "last_console_lines": lines[lines.len().saturating_sub(5)..],
    })
}

fn now_tsc() -> u64 {
    // SAFETY: RDTSC has no side effects (user mode may execute it unless
    // the kernel set CR4.TSD, which Linux does not).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `thinhv appliances [--json]`.
pub fn list(json_out: bool) -> ExitCode {
    let pg = match page_or_exit(json_out) {
        Ok(pg) => pg,
        Err(code) => return code,
    };
    let now = now_tsc();
    if json_out {
        let list: Vec<_> = pg
            .appliances
            .iter()
            .map(|r| record_json(r, now, &pg.log, exits(r, &pg.cpus)))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "appliances": list })).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    if pg.appliances.is_empty() {
        println!("no appliances ([[appliance]] in thinhv.toml)");
    }
    for r in &pg.appliances {
        let v = record_json(r, now, &pg.log, exits(r, &pg.cpus));
        println!(
            "{:<16} {:<9} cpus {} (from APIC {}, {}), {} MiB, uptime {}, restarts {}, crashes {}{}",
            v["name"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            r.cpu_count,
            r.first_apic_id,
            v["apic"].as_str().unwrap_or("?"),
            r.ram_size >> 20,
            uptime(r, now).map_or("-".to_string(), |s| format!("{s:.0} s")),
            r.restarts,
            r.crashes,
            if r.reason[0] == 0 {
                String::new()
            } else {
                format!(", last stop: {}", text(&r.reason))
            }
        );
        for l in v["last_console_lines"].as_array().into_iter().flatten() {
            println!("    | {}", l.as_str().unwrap_or(""));
        }
    }
    ExitCode::SUCCESS
}

/// `thinhv appliance console NAME`.
pub fn console(rest: &[String]) -> ExitCode {
    let Some(name) = rest.first() else {
        eprintln!("usage: thinhv appliance console NAME");
        return ExitCode::from(2);
    };
    let pg = match page_or_exit(false) {
        Ok(pg) => pg,
        Err(code) => return code,
    };
    if !pg.appliances.iter().any(|r| text(&r.name) == *name) {
        eprintln!("thinhv: no appliance named {name:?}");
        return ExitCode::FAILURE;
    }
    for l in console_lines(&pg.log, name) {
        println!("{l}");
    }
    ExitCode::SUCCESS
}

/// `thinhv appliance stop|start|restart NAME [--no-wait]`: rings the
/// doorbell, reads thinhv's answer, then (unless `--no-wait`) waits up to
/// 120 s until the appliance is stopped, or running again after it started.
pub fn control(op: ControlOp, rest: &[String]) -> ExitCode {
    let Some(name) = rest.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: thinhv appliance {} NAME [--no-wait]", op.name());
        return ExitCode::from(2);
    };
    let wait = !rest.iter().any(|a| a == "--no-wait");
    let pg = match page_or_exit(false) {
        Ok(pg) => pg,
        Err(code) => return code,
    };
    let Some(i) = pg.appliances.iter().position(|r| text(&r.name) == *name) else {
        eprintln!("thinhv: no appliance named {name:?}");
        return ExitCode::FAILURE;
    };
    let before = pg.appliances[i];
    let p = presence();
    let max_cpus = pg.header.max_cpus as usize;
    let doorbell = p.status_page + control_offset(max_cpus) as u64;
    let seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() | 1)
        ^ std::process::id();
    let cmd = ControlCommand {
        op,
        partition: u8::try_from(i + 1).unwrap_or(0),
        seq,
    };
    if let Err(e) = devmem::store_u64(doorbell, cmd.encode()) {
        eprintln!(
            "thinhv: cannot reach the appliance control doorbell at {doorbell:#x} through /dev/mem: {e} (root only)"
        );
        return ExitCode::FAILURE;
    }
    let answer = (0..200).find_map(|_| {
        let r = devmem::read(doorbell + 8, 8)
            .ok()
            .and_then(|b| u64::read_from_bytes(&b).ok())
            .map(ControlResult::decode)
            .filter(|r| r.seq == seq);
        if r.is_none() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        r
    });
    match answer.map(|r| r.status) {
        Some(Status::OK) => {}
        Some(Status::NOT_PERMITTED) => {
            eprintln!(
                "thinhv: {} {name:?} refused by thinhv: its vendor set control = \"none\"",
                op.name()
            );
            return ExitCode::FAILURE;
        }
        Some(s) => {
            eprintln!("thinhv: {} {name:?} refused: {}", op.name(), s.name());
            return ExitCode::FAILURE;
        }
        None => {
            eprintln!("thinhv: no answer from thinhv to {} {name:?}", op.name());
            return ExitCode::FAILURE;
        }
    }
    if !wait {
        println!("{} {name}: requested", op.name());
        return ExitCode::SUCCESS;
    }
    let done = |r: &ApplianceRecord| match op {
        ControlOp::Stop => r.state == 1,
        // Running after a start that began after the request.
        _ => r.state == 3 && r.started_tsc != before.started_tsc,
    };
    for _ in 0..1200 {
        let now = page_or_exit(false)
            .ok()
            .and_then(|pg| pg.appliances.get(i).copied());
        if let Some(r) = now.filter(|r| done(r) || (op != ControlOp::Stop && r.state == 4)) {
            if r.state == 4 {
                eprintln!(
                    "thinhv: {name:?} crashed while starting: {}",
                    text(&r.reason)
                );
                return ExitCode::FAILURE;
            }
            println!("{} {name}: {}", op.name(), appliance_state_name(r.state));
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("thinhv: {} {name:?}: not done after 120 s", op.name());
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_the_tagged_ones_without_the_prefix() {
        let log = "thinhv[cpu2] INFO  [store] hello\nthinhv INFO  other\nthinhv[cpu3] INFO  [store] world\nthinhv INFO  [mon] x\n";
        assert_eq!(console_lines(log, "store"), ["hello", "world"]);
        assert_eq!(console_lines(log, "mon"), ["x"]);
    }

    #[test]
    fn records_show_state_uptime_and_policy() {
        let mut r: ApplianceRecord = zerocopy::FromZeros::new_zeroed();
        r.name[..5].copy_from_slice(b"store");
        r.state = 3;
        r.cpu_count = 2;
        r.ram_size = 256 << 20;
        r.started_tsc = 1_000_000;
        r.tsc_khz = 1000;
        r.flags = u32::from(partition_flags::RESTART_ON_CRASH);
        let v = record_json(&r, 11_000_000, "", 0);
        assert_eq!(v["name"], "store");
        assert_eq!(v["state"], "running");
        assert_eq!(v["memory_mib"], 256);
        assert_eq!(v["uptime_seconds"], 10.0);
        assert_eq!(v["on_crash"], "restart");
        assert_eq!(v["control"], "none");
        assert_eq!(v["apic"], "xapic");
        r.flags |= thinhv_abi::status::APPLIANCE_IN_X2APIC;
        assert_eq!(record_json(&r, 11_000_000, "", 0)["apic"], "x2apic");
        r.state = 4;
        assert!(record_json(&r, 11_000_000, "", 0)["uptime_seconds"].is_null());
    }
}
