//! `thinhv status` and `thinhv log`.
use crate::NOT_PRESENT;
use crate::cpuid::{Presence, presence};
use crate::devmem;
use serde_json::json;
use std::process::ExitCode;
use thinhv_abi::exit::{EXIT_REASON_COUNT, ExitReason};
use thinhv_abi::status::{CpuRecord, CpuState, STATUS_MAGIC, StatusPageHeader};
use zerocopy::FromBytes;

/// The status page, read.
pub struct Page {
    /// Header.
    pub header: StatusPageHeader,
    /// CPU records.
    pub cpus: Vec<CpuRecord>,
    /// The log text held.
    pub log: String,
}

/// Reads and checks the status page.
pub fn read_page(p: &Presence) -> Result<Page, String> {
    let bytes = devmem::read(p.status_page, p.status_size as usize).map_err(|e| {
        format!(
            "cannot read the status page at {:#x} through /dev/mem: {e}",
            p.status_page
        )
    })?;
    let (header, _) =
        StatusPageHeader::read_from_prefix(&bytes).map_err(|_| "status page too small")?;
    if header.magic != STATUS_MAGIC {
        return Err(format!(
            "no status page at {:#x} (bad magic)",
            p.status_page
        ));
    }
    let mut cpus = Vec::new();
    for i in 0..header.max_cpus as usize {
        let off = header.cpus_offset as usize + i * header.cpu_record_size as usize;
        let rec = bytes
            .get(off..)
            .and_then(|b| CpuRecord::read_from_prefix(b).ok())
            .ok_or("truncated CPU records")?;
        cpus.push(rec.0);
    }
    let (lo, ls) = (header.log_offset as usize, header.log_size as usize);
    let ring = bytes.get(lo..lo + ls).ok_or("truncated log ring")?;
    let head = header.log_head;
    let start = head.saturating_sub(ls as u64);
    let text: Vec<u8> = (start..head)
        .filter_map(|i| {
            usize::try_from(i % ls as u64)
                .ok()
                .and_then(|j| ring.get(j).copied())
        })
        .collect();
    Ok(Page {
        header,
        cpus,
        log: String::from_utf8_lossy(&text).into_owned(),
    })
}

fn vendor_name(v: u32) -> &'static str {
    match v {
        thinhv_abi::hypercall::VENDOR_AMD_SVM => "AMD SVM",
        thinhv_abi::hypercall::VENDOR_INTEL_VMX => "Intel VMX",
        _ => "unknown",
    }
}

fn version(v: u32) -> String {
    let (a, b, c) = thinhv_abi::unpack_version(v);
    format!("{a}.{b}.{c}")
}

fn not_present(p: &Presence, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            json!({"present": false, "hypervisor_bit": p.hypervisor_bit,
            "signature": String::from_utf8_lossy(&p.signature)})
        );
    } else if p.hypervisor_bit {
        println!(
            "thinhv: not running (a hypervisor is present, signature {:?}, or thinhv hides itself)",
            String::from_utf8_lossy(&p.signature)
        );
    } else {
        println!("thinhv: not running (no hypervisor present)");
    }
    ExitCode::from(NOT_PRESENT)
}

/// `thinhv status`.
pub fn status(json: bool) -> ExitCode {
    let p = presence();
    if !p.is_thinhv() {
        return not_present(&p, json);
    }
    let page = read_page(&p);
    if json {
        let mut v = json!({
            "present": true,
            "signature": String::from_utf8_lossy(&p.signature),
            "version": version(p.version),
            "abi": p.abi,
            "vendor": vendor_name(p.vendor),
            "cpus_virtualized": p.cpus_virtualized,
            "cpus_expected": p.cpus_expected,
            "bytes_reserved": p.bytes_reserved,
            "status_page": p.status_page,
            "sealed": p.sealed,
        });
        match &page {
            Ok(pg) => {
                let cpus: Vec<_> = pg.cpus.iter().enumerate().map(|(i, c)| {
                    let exits: serde_json::Map<_, _> = ExitReason::ALL.iter()
                        .map(|r| (r.name().to_string(), json!(c.exits[r.index()]))).collect();
                    json!({"index": i, "apic_id": c.apic_id, "state": CpuState(c.state).name(), "exits": exits})
                }).collect();
                v["protected_base"] = json!(pg.header.protected_base);
                v["protected_size"] = json!(pg.header.protected_size);
                v["blocked_writes"] = json!(pg.header.blocked_writes);
                v["cpus"] = json!(cpus);
                v["exits_total"] = json!(
                    totals(&pg.cpus)
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (ExitReason::ALL[i].name().to_string(), json!(n)))
                        .collect::<serde_json::Map<_, _>>()
                );
                v["log"] = json!(pg.log);
            }
            Err(e) => v["status_page_error"] = json!(e),
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!(
        "thinhv {} (ABI {}), {}",
        version(p.version),
        p.abi,
        vendor_name(p.vendor)
    );
    println!(
        "signature:          {}",
        String::from_utf8_lossy(&p.signature)
    );
    println!(
        "CPUs virtualized:   {} of {}",
        p.cpus_virtualized, p.cpus_expected
    );
    println!(
        "memory reserved:    {} KiB ({} bytes)",
        p.bytes_reserved / 1024,
        p.bytes_reserved
    );
    println!("status page:        {:#x}", p.status_page);
    println!(
        "sealed:             {}",
        if p.sealed { "yes (OS running)" } else { "no" }
    );
    match page {
        Ok(pg) => {
            println!(
                "protected region:   {:#x} + {} KiB",
                pg.header.protected_base,
                pg.header.protected_size / 1024
            );
            println!("blocked writes:     {}", pg.header.blocked_writes);
            print!("\nexits by reason   ");
            for i in 0..pg.cpus.len() {
                print!("{:>10}", format!("cpu{i}"));
            }
            println!("{:>12}", "total");
            let t = totals(&pg.cpus);
            for r in ExitReason::ALL {
                print!("  {:<16}", r.name());
                for c in &pg.cpus {
                    print!("{:>10}", c.exits[r.index()]);
                }
                println!("{:>12}", t[r.index()]);
            }
            println!("\nhypervisor log:\n{}", pg.log.trim_end());
        }
        Err(e) => println!("\n(counters and log unavailable: {e}; run as root)"),
    }
    ExitCode::SUCCESS
}

fn totals(cpus: &[CpuRecord]) -> [u64; EXIT_REASON_COUNT] {
    let mut t = [0u64; EXIT_REASON_COUNT];
    for c in cpus {
        for (a, b) in t.iter_mut().zip(c.exits.iter()) {
            *a += b;
        }
    }
    t
}

/// `thinhv log`.
pub fn log() -> ExitCode {
    let p = presence();
    if !p.is_thinhv() {
        return not_present(&p, false);
    }
    match read_page(&p) {
        Ok(pg) => {
            print!("{}", pg.log);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thinhv: {e}");
            ExitCode::FAILURE
        }
    }
}
