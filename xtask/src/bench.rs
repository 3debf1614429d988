//! `cargo xtask bench`: boot time of the same Linux with and without
//! thinhv (same QEMU command line, same loader; `[hypervisor] enabled`
//! is the only difference), the exits taken during the boot, memory
//! reserved, and binary sizes.
use crate::{artifacts, root};
use serde_json::Value;
use std::time::Duration;
use thinhv_ovmf::esp::{self, Esp};
use thinhv_ovmf::qemu::{self, Profile, Serial};
use thinhv_ovmf::runner::{Run, WaitError, section};
use thinhv_ovmf::{firmware, linux};

const TIMEOUT: Duration = Duration::from_mins(5);

struct Sample {
    /// Seconds from QEMU's start to thinhv's banner (with thinhv).
    hv_start: Option<f64>,
    secs: f64,
    status: Option<Value>,
    /// The guest's serial output.
    out: String,
}

impl Sample {
    /// Bytes thinhv reserved, from the guest's status report (0 without).
    fn reserved(&self) -> u64 {
        self.status
            .as_ref()
            .and_then(|v| v.get("bytes_reserved"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// A machine other than the plain one: a name, extra QEMU arguments,
/// extra configuration and extra kernel options.
type Variant<'a> = (&'a str, &'a [&'a str], &'a str, &'a str);

/// One boot. `variant`: `None` for the plain machine (the PCI mediation
/// and appliance runs name theirs).
fn boot_once(
    a: &artifacts::Artifacts,
    img: &linux::LinuxImage,
    hv: bool,
    smp: u32,
    n: usize,
    variant: Option<Variant<'_>>,
) -> Result<Sample, String> {
    let build = root().join("build").join("bench");
    std::fs::create_dir_all(&build).map_err(|e| e.to_string())?;
    let tag = variant.map_or("", |v| v.0);
    let esp_dir = build.join(format!("esp-{}{tag}-{n}", if hv { "hv" } else { "native" }));
    let esp = Esp::create(&esp_dir).map_err(|e| e.to_string())?;
    esp.install_linux(img).map_err(|e| e.to_string())?;
    let options = esp::kernel_options(&format!(
        "quiet thinhv_bench=1 {}",
        variant.map_or("", |v| v.3)
    ));
    let mut config = esp::config_booting(esp::KERNEL, Some(&options), variant.map_or("", |v| v.2));
    if !hv {
        config = config.replace("[hypervisor]\n", "[hypervisor]\nenabled = false\n");
    }
    esp.install_thinhv(&a.efi, Some(&config))
        .map_err(|e| e.to_string())?;
    let ovmf = firmware::find()?;
    let vars = esp_dir.with_extension("vars.fd");
    std::fs::copy(&ovmf.vars, &vars).map_err(|e| e.to_string())?;
    let serial = esp_dir.with_extension("serial.txt");
    let mut profile = Profile::svm(smp);
    if let Some(v) = variant {
        profile.extra = v.1.iter().map(|s| (*s).to_string()).collect();
    }
    let cmd = qemu::command(
        &ovmf,
        &vars,
        &esp_dir,
        &profile,
        &Serial::File(serial.clone()),
    );
    let mut run = Run::start(cmd, &serial).map_err(|e| e.to_string())?;
    let hv_start = if hv {
        Some(
            run.wait_for("firmware-resident thin hypervisor", TIMEOUT)
                .map_err(|e| format!("{e}\n{}", run.output()))?
                .as_secs_f64(),
        )
    } else {
        None
    };
    let t = run
        .wait_for(linux::USERSPACE_MARKER, TIMEOUT)
        .map_err(|e| format!("{e}\n{}", run.output()))?;
    run.wait_for("THINHV-BENCH-JSON-END", Duration::from_mins(4))
        .map_err(|e| format!("{e}\n{}", run.output()))?;
    let out = run.output();
    let _ = run.wait_exit(Duration::from_secs(30));
    let status = json_between(&out, "THINHV-BENCH-JSON-BEGIN", "THINHV-BENCH-JSON-END");
    Ok(Sample {
        hv_start,
        secs: t.as_secs_f64(),
        status,
        out,
    })
}

/// NVMe sequential read in the guest (512 MiB, O_DIRECT, 1 MiB blocks) on
/// q35 with `intel-iommu`: with thinhv owning the IOMMU (every DMA
/// translated) or without thinhv; same QEMU command line. Seconds.
fn nvme_once(
    a: &artifacts::Artifacts,
    img: &linux::LinuxImage,
    hv: bool,
    n: usize,
) -> Result<f64, String> {
    let case = NvmeCase {
        tag: if hv { "hv" } else { "native" },
        hv,
        iommu: "",
        kernel: "",
        eim: false,
        amd: false,
        nic_port: None,
        idle: false,
    };
    nvme_case(a, img, &case, n)?
        .map(|r| r.nvme_s)
        .ok_or_else(|| "the NVMe boot never reached THINHV-TEST-END".to_string())
}

/// One way of running [`nvme_once`]'s machine: thinhv or not, more
/// `[iommu]` lines, more kernel options.
struct NvmeCase {
    tag: &'static str,
    hv: bool,
    iommu: &'static str,
    kernel: &'static str,
    /// QEMU's unit with interrupt remapping and 32-bit destinations.
    eim: bool,
    /// QEMU's AMD-Vi unit (`amd-iommu,pt=off`) instead of its VT-d one.
    amd: bool,
    /// An e1000e on QEMU's user network, and the port of the host's
    /// [`NicServer`] the guest reads from.
    nic_port: Option<u16>,
    /// thinhv's status when userspace is up and a minute of idle later.
    idle: bool,
}

/// What one boot of [`nvme_case`] measured.
struct CaseRun {
    /// Seconds of the NVMe read.
    nvme_s: f64,
    /// Seconds of the NIC transfer ([`NIC_BYTES`]).
    nic: Option<f64>,
    /// `thinhv status --json` after the reads, where thinhv ran.
    status: Option<Value>,
    /// Exits by reason (all CPUs) over the idle minute, and the seconds
    /// of guest uptime it took.
    idle: Option<(Value, f64)>,
    /// Exits by reason from start to userspace (before the idle minute).
    at_userspace: Option<Value>,
}

/// The host's end of the NIC transfer: a TCP server on the loopback
/// (QEMU's user network reaches it at 10.0.2.2) that sends `bytes` to
/// every connection and closes it.
struct NicServer {
    port: u16,
}

impl NicServer {
    fn start(bytes: usize) -> Result<Self, String> {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        std::thread::spawn(move || {
            let block = vec![0x5a_u8; 64 << 10];
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(block.len());
                    if c.write_all(&block[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        });
        Ok(Self { port })
    }
}

/// Bytes the NIC transfer moves.
const NIC_BYTES: usize = 128 << 20;

/// The JSON document the guest printed between `begin` and `end`.
fn json_between(out: &str, begin: &str, end: &str) -> Option<Value> {
    section(out, begin, end).and_then(|j| serde_json::from_str::<Value>(j.trim()).ok())
}

/// `exits_total` of a `thinhv status --json` between `begin` and `end`.
fn exits_between(out: &str, begin: &str, end: &str) -> Option<Value> {
    json_between(out, begin, end).and_then(|v| v.get("exits_total").cloned())
}

/// `b - a` for each reason.
fn exits_delta(a: &Value, b: &Value) -> Value {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Value::Null;
    };
    Value::Object(
        b.iter()
            .map(|(k, v)| {
                let before = a.get(k).and_then(Value::as_u64).unwrap_or(0);
                (
                    k.clone(),
                    serde_json::json!(v.as_u64().unwrap_or(0).saturating_sub(before)),
                )
            })
            .collect(),
    )
}

/// The reasons with a count, as `name count, ...`.
fn exits_list(ex: &Value) -> String {
    ex.as_object().map_or_else(String::new, |m| {
        m.iter()
            .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// [`nvme_once`] for `case`; `None` where the boot never reached its end
/// marker.
fn nvme_case(
    a: &artifacts::Artifacts,
    img: &linux::LinuxImage,
    case: &NvmeCase,
    n: usize,
) -> Result<Option<CaseRun>, String> {
    let build = root().join("build").join("bench");
    std::fs::create_dir_all(&build).map_err(|e| e.to_string())?;
    let esp_dir = build.join(format!("nvme-{}-{n}", case.tag));
    let esp = Esp::create(&esp_dir).map_err(|e| e.to_string())?;
    esp.install_linux(img).map_err(|e| e.to_string())?;
    let nic = case
        .nic_port
        .map(|port| format!(" thinhv_nic_bench={port}"))
        .unwrap_or_default();
    let idle = if case.idle {
        " thinhv_idle_minute=1"
    } else {
        ""
    };
    let options = esp::kernel_options(&format!(
        "quiet thinhv_test=1 thinhv_nvme_bench=1 {}{nic}{idle}",
        case.kernel
    ));
    let mut config = esp::config_booting(
        esp::KERNEL,
        Some(&options),
        &format!("\n[iommu]\nmode = \"protect\"\n{}", case.iommu),
    );
    if !case.hv {
        config = config.replace("[hypervisor]\n", "[hypervisor]\nenabled = false\n");
    }
    esp.install_thinhv(&a.efi, Some(&config))
        .map_err(|e| e.to_string())?;
    let disk = build.join("nvme-bench.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(512 << 20))
        .map_err(|e| e.to_string())?;
    let ovmf = firmware::find()?;
    let vars = esp_dir.with_extension("vars.fd");
    std::fs::copy(&ovmf.vars, &vars).map_err(|e| e.to_string())?;
    let serial = esp_dir.with_extension("serial.txt");
    let mut p = Profile::svm(2);
    p.extra = [
        "-device".to_string(),
        if case.amd {
            "amd-iommu,pt=off".into()
        } else if case.eim {
            "intel-iommu,intremap=on,eim=on".into()
        } else {
            "intel-iommu".into()
        },
        "-drive".into(),
        format!("file={},if=none,id=nv0,format=raw", disk.display()),
        "-device".into(),
        "nvme,serial=bench0,drive=nv0".into(),
    ]
    .to_vec();
    if case.nic_port.is_some() {
        p.extra
            .extend(["-netdev", "user,id=n0", "-device", "e1000e,netdev=n0"].map(String::from));
    }
    let cmd = qemu::command(&ovmf, &vars, &esp_dir, &p, &Serial::File(serial.clone()));
    let mut run = Run::start(cmd, &serial).map_err(|e| e.to_string())?;
    match run.wait_for("THINHV-TEST-END", TIMEOUT + Duration::from_secs(90)) {
        Ok(_) => {}
        // Hung: the caller decides (the QEMU process ends with `run`).
        Err(WaitError::Timeout { .. }) => return Ok(None),
        Err(e) => return Err(format!("{e}\n{}", run.output())),
    }
    let out = run.output();
    let _ = run.wait_exit(Duration::from_secs(30));
    if case.hv
        && !out.contains("VT-d units translating")
        && !out.contains("AMD-Vi IOMMUs translating")
    {
        return Err(format!("thinhv did not take the IOMMU:\n{out}"));
    }
    let secs = thinhv_ovmf::runner::value(&out, "nvme_read_512m_seconds")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("the guest did not time the NVMe read:\n{out}"))?;
    let status = json_between(&out, "THINHV-STATUS-JSON-BEGIN", "THINHV-STATUS-JSON-END");
    let num =
        |k: &str| thinhv_ovmf::runner::value(&out, k).and_then(|v| v.trim().parse::<f64>().ok());
    let mut nic = None;
    if case.nic_port.is_some() {
        let bytes = thinhv_ovmf::runner::value(&out, "nic_read_bytes")
            .and_then(|v| v.trim().parse::<usize>().ok());
        let (Some(bytes), Some(secs)) = (bytes, num("nic_read_seconds")) else {
            return Err(format!("the guest did not time the NIC transfer:\n{out}"));
        };
        if bytes != NIC_BYTES {
            return Err(format!(
                "the NIC transfer moved {bytes} bytes, not {NIC_BYTES}:\n{out}"
            ));
        }
        nic = Some(secs);
    }
    let mut idle = None;
    let mut at_userspace = None;
    if case.idle && case.hv {
        let a0 = exits_between(&out, "THINHV-IDLE-0-BEGIN", "THINHV-IDLE-0-END");
        let a1 = exits_between(&out, "THINHV-IDLE-1-BEGIN", "THINHV-IDLE-1-END");
        let (Some(a0), Some(a1), Some(u0), Some(u1)) =
            (a0, a1, num("idle_uptime_0"), num("idle_uptime_1"))
        else {
            return Err(format!("the guest did not report its idle minute:\n{out}"));
        };
        idle = Some((exits_delta(&a0, &a1), u1 - u0));
        at_userspace = Some(a0);
    }
    Ok(Some(CaseRun {
        nvme_s: secs,
        nic,
        status,
        idle,
        at_userspace,
    }))
}

/// `cargo xtask bench --os-iommu`: the OS's own emulated VT-d unit
/// (issue 14) against the same machine without it and without thinhv:
/// the NVMe read of [`nvme_once`] and a NIC transfer ([`NicServer`]) in
/// every boot, runs of every case alternated, and the exits by reason of
/// each boot under thinhv (status taken after the reads); then one boot
/// with and one without the OS's unit that idles a minute at userspace,
/// with the exits by reason from start to userspace and over the minute.
fn os_iommu_figures(
    a: &artifacts::Artifacts,
    img: &linux::LinuxImage,
    runs: usize,
) -> Result<Value, String> {
    const EMULATED: &str = "os = \"emulated\"\n";
    // THINHV_BENCH_IOMMU=amd: the same cases on QEMU's AMD-Vi unit (its
    // Linux options name no VT-d, and AMD-Vi offers the OS no interrupt
    // remapping).
    let amd = std::env::var("THINHV_BENCH_IOMMU").is_ok_and(|v| v == "amd");
    let server = NicServer::start(NIC_BYTES)?;
    let case = |tag, hv, iommu, kernel| NvmeCase {
        tag,
        hv,
        iommu,
        kernel,
        eim: true,
        amd,
        nic_port: Some(server.port),
        idle: false,
    };
    let cases = [
        case("native", false, "", ""),
        case(
            "native-iommu-strict",
            false,
            "",
            "intel_iommu=on iommu.strict=1",
        ),
        case("hv", true, "", ""),
        case(
            "hv-os-strict",
            true,
            EMULATED,
            "intel_iommu=on iommu.strict=1",
        ),
        case("hv-os-default", true, EMULATED, "intel_iommu=on"),
    ];
    // THINHV_BENCH_ONLY=tag,tag: those cases alone (the first one is the
    // base of the ratios), no idle minute unless "idle" is among them.
    let only = std::env::var("THINHV_BENCH_ONLY").ok();
    let wanted = |tag: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|t| t == tag))
    };
    let cases: Vec<NvmeCase> = cases
        .into_iter()
        .filter(|c| wanted(c.tag))
        .map(|c| NvmeCase {
            kernel: match (amd, c.tag) {
                (false, _) => c.kernel,
                // Without thinhv Linux would drive QEMU's AMD-Vi itself,
                // and its interrupt remapping too, which QEMU's unit does
                // only with `intremap=on` (`emulator-faults.md`): the
                // base is Linux without an IOMMU, as on VT-d.
                (true, "native") => "amd_iommu=off",
                (true, _) => c.kernel.trim_start_matches("intel_iommu=on").trim_start(),
            },
            ..c
        })
        .collect();
    if cases.is_empty() {
        return Err("THINHV_BENCH_ONLY names no case".into());
    }
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut nic: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut exits: Vec<Option<Value>> = vec![None; cases.len()];
    // Boots that never reached their end marker: counted and reported,
    // left out of the medians (docs/emulator-faults.md).
    let mut hung = vec![0usize; cases.len()];
    for n in 0..runs {
        for (i, c) in cases.iter().enumerate() {
            let Some(r) = nvme_case(a, img, c, n)? else {
                println!(
                    "run {n}: {:<22} HUNG: no end marker (serial: build/bench/nvme-{}-{n}.serial.txt)",
                    c.tag, c.tag
                );
                hung[i] += 1;
                continue;
            };
            let t = r.nic.ok_or("no NIC figure")?;
            println!(
                "run {n}: {:<22} NVMe 512 MiB {:.2} s, NIC 128 MiB {t:.2} s",
                c.tag, r.nvme_s
            );
            secs[i].push(r.nvme_s);
            nic[i].push(t);
            if let Some(st) = r.status {
                exits[i] = st.get("exits_total").cloned();
            }
        }
    }
    // The idle minute: thinhv alone, and with the OS driving its unit in
    // Linux's default mode (strict on a unit with caching mode: Linux
    // says "IOMMU batching disallowed due to virtualization").
    let mut idle = Vec::new();
    let idle_cases = cases
        .iter()
        .filter(|c| c.tag == "hv" || c.tag == "hv-os-default");
    for c in idle_cases.filter(|_| wanted("idle")) {
        let c = NvmeCase {
            idle: true,
            nic_port: None,
            ..*c
        };
        let Some(r) = nvme_case(a, img, &c, runs)? else {
            println!("idle: {:<22} HUNG: no end marker", c.tag);
            continue;
        };
        let (ex, secs) = r.idle.ok_or("no idle figures")?;
        println!("idle: {:<22} {secs:.1} s: {}", c.tag, exits_list(&ex));
        idle.push((c.tag, ex, secs, r.at_userspace.unwrap_or(Value::Null)));
    }
    if secs.iter().any(Vec::is_empty) {
        return Err(format!(
            "a case has no completed run (hung: {hung:?}, cases {:?})",
            cases.iter().map(|c| c.tag).collect::<Vec<_>>()
        ));
    }
    let base = median(&mut secs[0].clone());
    let nic_base = median(&mut nic[0].clone());
    println!();
    println!(
        "thinhv bench --os-iommu: QEMU TCG, q35 + {} + e1000e on QEMU's user network, -smp 2; NVMe sequential read, 512 MiB, O_DIRECT, 1 MiB blocks; NIC: 128 MiB over TCP from the host (nc); median of {runs} runs, cases alternated",
        if amd {
            "amd-iommu,pt=off"
        } else {
            "intel-iommu,intremap=on,eim=on"
        }
    );
    let mut out = serde_json::Map::new();
    for (i, c) in cases.iter().enumerate() {
        let m = median(&mut secs[i].clone());
        let mn = median(&mut nic[i].clone());
        println!(
            "  {:<22} NVMe {:7.1} MiB/s ratio {:5.3} {:.2?} s | NIC {:6.1} MiB/s ratio {:5.3} {:.2?} s{}",
            c.tag,
            512.0 / m,
            base / m,
            secs[i],
            128.0 / mn,
            nic_base / mn,
            nic[i],
            if hung[i] > 0 {
                format!(" | {} of {runs} boots hung", hung[i])
            } else {
                String::new()
            }
        );
        out.insert(
            c.tag.to_string(),
            serde_json::json!({"seconds": secs[i], "median_s": m, "ratio_to_native": base / m,
                "nic_seconds": nic[i], "nic_median_s": mn, "nic_ratio_to_native": nic_base / mn,
                "exits_total": exits[i], "hung": hung[i]}),
        );
    }
    println!("  exits during boot and reads, by reason (all CPUs), thinhv cases:");
    for (i, c) in cases.iter().enumerate() {
        if let Some(ex) = &exits[i] {
            println!("    {:<22} {}", c.tag, exits_list(ex));
        }
    }
    println!("  exits from start to userspace, then over a minute at idle (all CPUs):");
    let mut idle_json = serde_json::Map::new();
    for (tag, ex, secs, boot) in &idle {
        println!("    {tag:<22} to userspace: {}", exits_list(boot));
        println!("    {:<22} idle {secs:.1} s:   {}", "", exits_list(ex));
        idle_json.insert(
            (*tag).to_string(),
            serde_json::json!({"idle_seconds": secs, "idle_exits": ex, "to_userspace_exits": boot}),
        );
    }
    out.insert("idle_minute".into(), Value::Object(idle_json));
    Ok(Value::Object(out))
}

/// The EFI probe, bare or under thinhv (same QEMU line): its report
/// (`key=value` lines), which carries the exit round trips it measured.
fn probe_once(a: &artifacts::Artifacts, hv: bool, n: usize) -> Result<String, String> {
    let build = root().join("build").join("bench");
    std::fs::create_dir_all(&build).map_err(|e| e.to_string())?;
    let esp_dir = build.join(format!("probe-{}-{n}", if hv { "hv" } else { "bare" }));
    let esp = Esp::create(&esp_dir).map_err(|e| e.to_string())?;
    if hv {
        esp.put_file(esp::PROBE, &a.probe)
            .and_then(|()| {
                esp.install_thinhv(&a.efi, Some(&format!("[boot]\nnext = '{}'\n", esp::PROBE)))
            })
            .map_err(|e| e.to_string())?;
    } else {
        esp.put_file(r"\EFI\BOOT\BOOTX64.EFI", &a.probe)
            .map_err(|e| e.to_string())?;
    }
    let ovmf = firmware::find()?;
    let vars = esp_dir.with_extension("vars.fd");
    std::fs::copy(&ovmf.vars, &vars).map_err(|e| e.to_string())?;
    let serial = esp_dir.with_extension("serial.txt");
    let cmd = qemu::command(
        &ovmf,
        &vars,
        &esp_dir,
        &Profile::svm(1),
        &Serial::File(serial.clone()),
    );
    let mut run = Run::start(cmd, &serial).map_err(|e| e.to_string())?;
    run.wait_for("THINHV-PROBE-END", TIMEOUT)
        .map_err(|e| format!("{e}\n{}", run.output()))?;
    let out = run.output();
    let _ = run.wait_exit(Duration::from_secs(20));
    section(&out, "THINHV-PROBE-BEGIN", "THINHV-PROBE-END")
        .map(str::to_string)
        .ok_or_else(|| format!("no probe report:\n{out}"))
}

/// Exit round trips (CPUID, APIC write) in TSC cycles, measured by the
/// probe inside the guest, bare and under thinhv, runs alternated. Returns
/// medians over runs of each run's median: [cpuid bare, cpuid hv, apic
/// bare, apic hv, cpuid in thinhv's handler, apic write in the handler].
fn exit_round_trips(a: &artifacts::Artifacts, runs: usize) -> Result<[f64; 6], String> {
    let mut v: [Vec<f64>; 6] = Default::default();
    let get = |r: &str, k: &str| -> Result<f64, String> {
        thinhv_ovmf::runner::value(r, k)
            .and_then(|x| x.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("the probe did not report {k}:\n{r}"))
    };
    for n in 0..runs {
        let bare = probe_once(a, false, n)?;
        let hv = probe_once(a, true, n)?;
        if thinhv_ovmf::runner::value(&hv, "signature").map(str::trim) != Some("ThinHVThinHV") {
            return Err(format!("thinhv did not run under the probe:\n{hv}"));
        }
        for (i, (r, k)) in [
            (&bare, "bench_cpuid_cycles_median"),
            (&hv, "bench_cpuid_cycles_median"),
            (&bare, "bench_apic_write_cycles_median"),
            (&hv, "bench_apic_write_cycles_median"),
            (&hv, "bench_cpuid_handler_cycles"),
            (&hv, "bench_apic_write_handler_cycles"),
        ]
        .into_iter()
        .enumerate()
        {
            v[i].push(get(r, k)?);
        }
        println!(
            "run {n}: CPUID {:.0} / {:.0} cycles, APIC write {:.0} / {:.0} cycles (bare / thinhv); \
             in thinhv's handler {:.0} / {:.0}",
            v[0][n], v[1][n], v[2][n], v[3][n], v[4][n], v[5][n]
        );
    }
    Ok(v.map(|mut x| median(&mut x)))
}

/// The number after `key` in `text` (`key` ends where the number starts).
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The exits on the appliance's processors between the guest's two
/// samples `THINHV-BENCH-APPLIANCE{tag}-1/-2` (`thinhv appliances --json`)
/// and `THINHV-BENCH-STATUS{tag}-1/-2` (`thinhv status --json`): seconds
/// between them, exits per second, and per second by reason.
fn appliance_exits(out: &str, tag: &str) -> Result<(f64, f64, String), String> {
    let sample = |k: u32| -> Option<Value> {
        let j = section(
            out,
            &format!("THINHV-BENCH-APPLIANCE{tag}-{k}-BEGIN"),
            &format!("THINHV-BENCH-APPLIANCE{tag}-{k}-END"),
        )?;
        serde_json::from_str::<Value>(j.trim()).ok()?["appliances"][0]
            .clone()
            .into()
    };
    let (Some(first), Some(second)) = (sample(1), sample(2)) else {
        return Err(format!("no appliance samples:\n{out}"));
    };
    // Differences of counters: small enough for an f64.
    #[allow(clippy::cast_precision_loss)]
    let diff = |k: &str| {
        second[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(first[k].as_u64().unwrap_or(0)) as f64
    };
    #[allow(clippy::cast_precision_loss)]
    let khz = first["tsc_khz"].as_u64().unwrap_or(1) as f64;
    let secs = diff("tsc") / (khz * 1000.0);
    let rate = diff("exits") / secs;
    // By reason: the appliance's CPU records in the two status pages.
    let mask = first["cpu_mask"].as_u64().unwrap_or(0);
    let reasons = |k: u32| -> std::collections::BTreeMap<String, u64> {
        let mut m = std::collections::BTreeMap::new();
        let status = json_between(
            out,
            &format!("THINHV-BENCH-STATUS{tag}-{k}-BEGIN"),
            &format!("THINHV-BENCH-STATUS{tag}-{k}-END"),
        );
        let cpus = status.as_ref().and_then(|v| v["cpus"].as_array().cloned());
        for (i, c) in cpus.unwrap_or_default().iter().enumerate() {
            if i < 64 && mask & (1 << i) != 0 {
                for (r, n) in c["exits"].as_object().into_iter().flatten() {
                    *m.entry(r.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                }
            }
        }
        m
    };
    let (r1, r2) = (reasons(1), reasons(2));
    #[allow(clippy::cast_precision_loss)]
    let by_reason: Vec<String> = r2
        .iter()
        .filter_map(|(r, n)| {
            let d = n.saturating_sub(*r1.get(r).unwrap_or(&0));
            (d > 0).then(|| format!("{r} {:.1}/s", d as f64 / secs))
        })
        .collect();
    Ok((secs, rate, by_reason.join(", ")))
}

/// An appliance beside the OS (`docs/appliances.md`), runs alternated with
/// the same machine without it: `-smp 4`, q35 with VT-d (thinhv's), the
/// Debian kernel as both; the appliance has 2 CPUs and 256 MiB, the OS
/// the other 2. Prints and returns the figures.
fn appliance_figures(
    a: &artifacts::Artifacts,
    img: &linux::LinuxImage,
    runs: usize,
) -> Result<Value, String> {
    const APPLIANCE: &str = esp::TEST_APPLIANCE;
    const IOMMU: [&str; 2] = ["-device", "intel-iommu"];
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    let (mut alone_up, mut beside_up) = (Vec::new(), Vec::new());
    let (mut alone2, mut alone2_up) = (Vec::new(), Vec::new());
    let (mut app_wall, mut app_own, mut app_from_hv) = (Vec::new(), Vec::new(), Vec::new());
    let mut idle_rate = Vec::new();
    let mut idle_reasons = Vec::new();
    let mut reserved = (0u64, 0u64);
    let os_uptime = |out: &str| number_after(out, "THINHV-GUEST: userspace up after ");
    for n in 0..runs {
        // The OS alone on all four processors, and on as many as it keeps
        // beside the appliance.
        for (cpus, tag) in [(4, "-no-appliance"), (2, "-no-appliance-2")] {
            let s = boot_once(a, img, true, cpus, n, Some((tag, &IOMMU, "", "")))?;
            let up = os_uptime(&s.out).unwrap_or(f64::NAN);
            println!(
                "run {n}: OS alone ({cpus} CPUs)          userspace at {:.2} s (its uptime {up:.2} s)",
                s.secs
            );
            let (wall, uptime) = if cpus == 4 {
                reserved.0 = s.reserved();
                (&mut alone, &mut alone_up)
            } else {
                (&mut alone2, &mut alone2_up)
            };
            wall.push(s.secs);
            uptime.push(up);
        }
        let s = boot_once(
            a,
            img,
            true,
            4,
            n,
            Some(("-appliance", &IOMMU, APPLIANCE, "thinhv_bench_appliance=1")),
        )?;
        let up = os_uptime(&s.out).unwrap_or(f64::NAN);
        beside.push(s.secs);
        beside_up.push(up);
        reserved.1 = s.reserved();
        let seen = number_after(&s.out, "THINHV-BENCH-APPLIANCE: up_at_os_uptime=")
            .ok_or_else(|| format!("the OS did not see the appliance come up:\n{}", s.out))?;
        let own = s
            .out
            .lines()
            .find(|l| l.contains("THINHV-BENCH-APPLIANCE: up"))
            .and_then(|l| number_after(l, "userspace up after "))
            .unwrap_or(f64::NAN);
        // When the OS saw it, on QEMU's clock: the OS's marker plus the
        // OS's uptime since (the OS polls every 0.2 s: an upper bound).
        let wall = s.secs + (seen - up);
        let hv = s.hv_start.unwrap_or(0.0);
        let (secs, rate, by_reason) = appliance_exits(&s.out, "")?;
        idle_reasons.push(by_reason);
        println!(
            "run {n}: OS beside an appliance (2+2) userspace at {:.2} s (its uptime {up:.2} s); \
             appliance up at {wall:.2} s ({:.2} s after thinhv's start; its own uptime {own:.2} s), \
             idle exits {rate:.1}/s over {secs:.1} s ({})",
            s.secs,
            wall - hv,
            idle_reasons.last().map_or("", String::as_str)
        );
        app_wall.push(wall);
        app_from_hv.push(wall - hv);
        app_own.push(own);
        idle_rate.push(rate);
    }
    let m = |v: &Vec<f64>| median(&mut v.clone());
    println!();
    println!(
        "  appliance partitions (-smp 4, q35 + VT-d, 1024 MiB; appliance 2 CPUs, 256 MiB; median of {runs}, runs alternated):"
    );
    println!(
        "    OS userspace, no appliance (4 CPUs):   {:6.2} s from QEMU start, its uptime {:6.2} s",
        m(&alone),
        m(&alone_up)
    );
    println!(
        "    OS userspace, no appliance (2 CPUs):   {:6.2} s from QEMU start, its uptime {:6.2} s",
        m(&alone2),
        m(&alone2_up)
    );
    println!(
        "    OS userspace beside it (2 CPUs):       {:6.2} s from QEMU start, its uptime {:6.2} s",
        m(&beside),
        m(&beside_up)
    );
    println!(
        "    ratio beside / alone on 4 CPUs:        {:6.3} wall, {:6.3} OS uptime",
        m(&beside) / m(&alone),
        m(&beside_up) / m(&alone_up)
    );
    println!(
        "    ratio beside / alone on 2 CPUs:        {:6.3} wall, {:6.3} OS uptime (in TCG the \
         appliance's processors share the host's cores with the OS's)",
        m(&beside) / m(&alone2),
        m(&beside_up) / m(&alone2_up)
    );
    println!(
        "    appliance userspace: {:.2} s from QEMU start, {:.2} s after thinhv's start, its own uptime {:.2} s",
        m(&app_wall),
        m(&app_from_hv),
        m(&app_own)
    );
    println!(
        "    exits on the appliance's CPUs at idle: {:.1} per second (both CPUs)",
        m(&idle_rate)
    );
    println!(
        "    thinhv's reservation: {} KiB without, {} KiB with the appliance (+{} KiB; its 256 MiB and image copy are its own)",
        reserved.0 / 1024,
        reserved.1 / 1024,
        reserved.1.saturating_sub(reserved.0) / 1024
    );
    Ok(serde_json::json!({
        "os_alone_s": alone, "os_alone_uptime_s": alone_up,
        "os_alone_2cpus_s": alone2, "os_alone_2cpus_uptime_s": alone2_up,
        "os_beside_appliance_s": beside, "os_beside_appliance_uptime_s": beside_up,
        "appliance_up_s": app_wall, "appliance_up_after_thinhv_s": app_from_hv,
        "appliance_own_uptime_s": app_own, "appliance_idle_exits_per_s": idle_rate,
        "appliance_idle_exits_by_reason": idle_reasons,
        "reserved_without": reserved.0, "reserved_with": reserved.1,
    }))
}

/// An appliance's own NVMe controller (given whole, behind a root port)
/// against the OS's own (on the root bus), on one machine: `-smp 4`, q35
/// with VT-d (thinhv's), 256 MiB disks. The appliance reads 128 MiB with
/// O_DIRECT in 1 MiB blocks, again and again for 30 s; the OS samples the
/// exits on the appliance's processors over 10 s of that, then reads its
/// own controller the same way twenty times. Prints and returns the
/// figures.
///
/// With `vf`, one NVMe PF with SR-IOV behind the root port instead, which
/// thinhv keeps: the appliance reads its VF 2's namespace, the OS its VF
/// 1's (shown to it in the PF's place).
fn appliance_nvme_figures(
    a: &artifacts::Artifacts,
    img: &linux::LinuxImage,
    runs: usize,
    vf: bool,
) -> Result<Value, String> {
    let build = root().join("build").join("bench");
    std::fs::create_dir_all(&build).map_err(|e| e.to_string())?;
    let disk = |name: &str| -> Result<String, String> {
        let p = build.join(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(256 << 20))
            .map_err(|e| e.to_string())?;
        Ok(p.display().to_string())
    };
    let (os_disk, app_disk) = (disk("nvme-os.img")?, disk("nvme-appliance.img")?);
    let whole = [
        "-device",
        "intel-iommu",
        "-drive",
        &format!("file={os_disk},if=none,id=osnvme,format=raw"),
        "-device",
        "nvme,drive=osnvme,serial=os0",
        "-device",
        "pcie-root-port,id=rp1,chassis=1,addr=0x7",
        "-drive",
        &format!("file={app_disk},if=none,id=anvme,format=raw"),
        "-device",
        "nvme,drive=anvme,serial=appliance0,bus=rp1",
    ]
    .map(String::from)
    .to_vec();
    let mut vfs = vec![String::from("-device"), String::from("intel-iommu")];
    vfs.extend(qemu::nvme_sriov_machine(&os_disk, &app_disk));
    let args = if vf { vfs } else { whole };
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let config = esp::TEST_APPLIANCE.replace(
        "thinhv_appliance=1",
        "thinhv_appliance=1 thinhv_appliance_nvme_bench=1",
    ) + if vf {
        "devices = [\"vf:0000:01:00.0#2\"]\n\n[[sriov]]\ndevice = \"0000:01:00.0\"\nos_vfs = 1\n"
    } else {
        "devices = [\"0000:01:00.0\"]\n"
    };
    let reads = |out: &str, who: &str| -> Vec<f64> {
        out.lines()
            .filter_map(|l| {
                l.strip_prefix(&format!("THINHV-BENCH-NVME: {who} nvme read 128 MiB in "))
            })
            .filter_map(|l| l.trim_end_matches(" s").trim().parse().ok())
            .collect()
    };
    let (mut app, mut os, mut rates, mut why) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..runs {
        let s = boot_once(
            a,
            img,
            true,
            4,
            n,
            Some((
                "-appliance-nvme",
                &extra,
                &config,
                "thinhv_bench_appliance_nvme=1",
            )),
        )?;
        let (mut a_reads, mut o_reads) = (reads(&s.out, "appliance"), reads(&s.out, "os"));
        if a_reads.is_empty() || o_reads.is_empty() {
            return Err(format!("no NVMe read times:\n{}", s.out));
        }
        let (secs, rate, by_reason) = appliance_exits(&s.out, "-NVME")?;
        let (ma, mo) = (median(&mut a_reads), median(&mut o_reads));
        println!(
            "run {n}: 128 MiB NVMe read: appliance {ma:.3} s (median of {}), OS {mo:.3} s (median of {}); \
             exits on the appliance's CPUs while it reads: {rate:.1}/s over {secs:.1} s ({by_reason})",
            a_reads.len(),
            o_reads.len()
        );
        app.push(ma);
        os.push(mo);
        rates.push(rate);
        why.push(by_reason);
    }
    let m = |v: &Vec<f64>| median(&mut v.clone());
    println!();
    println!(
        "  appliance NVMe ({}; -smp 4, q35 + VT-d; median of {runs}):",
        if vf {
            "its VF of an NVMe PF thinhv keeps, the OS on another VF of it"
        } else {
            "its own controller, given whole"
        }
    );
    println!(
        "    128 MiB O_DIRECT read: appliance {:.3} s ({:.0} MiB/s), OS on its own {} {:.3} s ({:.0} MiB/s), ratio appliance/OS {:.3}",
        m(&app),
        128.0 / m(&app),
        if vf { "VF" } else { "controller" },
        m(&os),
        128.0 / m(&os),
        m(&app) / m(&os)
    );
    println!(
        "    exits on the appliance's CPUs during its reads: {:.1} per second (both CPUs)",
        m(&rates)
    );
    Ok(serde_json::json!({
        "appliance_read_128m_s": app, "os_read_128m_s": os,
        "appliance_exits_per_s_while_reading": rates,
        "appliance_exits_by_reason_while_reading": why,
    }))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--os-iommu-model`: what composing the OS's IOMMU programming costs
/// on this host, before any exit (`thin-hv-core/examples/os_iommu_cost.rs`,
/// `docs/os-iommu.md`); no emulator involved.
fn os_iommu_model() -> Result<(), String> {
    let st = std::process::Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "thin-hv-core",
            "--example",
            "os_iommu_cost",
        ])
        .status()
        .map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("the OS IOMMU model benchmark failed ({st})"))
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut runs = 3usize;
    let mut smp = 2u32;
    let mut only_appliances = false;
    let mut only_nvme = false;
    let mut only_nvme_vf = false;
    let mut only_os_iommu = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--runs needs a number")?;
            }
            "--smp" => {
                smp = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--smp needs a number")?;
            }
            "--appliances" => only_appliances = true,
            "--appliance-nvme" => only_nvme = true,
            "--appliance-nvme-vf" => only_nvme_vf = true,
            "--os-iommu-model" => return os_iommu_model(),
            "--os-iommu" => only_os_iommu = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    crate::deps::ensure()?;
    let a = artifacts::build()?;
    let img = linux::prepare(&root().join("build/cache"), &a.tool)?;
    if only_os_iommu {
        let name = if std::env::var("THINHV_BENCH_IOMMU").is_ok_and(|v| v == "amd") {
            "bench-os-iommu-amd.json"
        } else {
            "bench-os-iommu.json"
        };
        return save(name, &os_iommu_figures(&a, &img, runs)?);
    }
    if only_nvme {
        return save(
            "bench-appliance-nvme.json",
            &appliance_nvme_figures(&a, &img, runs, false)?,
        );
    }
    if only_nvme_vf {
        return save(
            "bench-appliance-nvme-vf.json",
            &appliance_nvme_figures(&a, &img, runs, true)?,
        );
    }
    let appliances = appliance_figures(&a, &img, runs)?;
    if only_appliances {
        return save("bench-appliances.json", &appliances);
    }
    let trips = exit_round_trips(&a, runs)?;
    let mut native = Vec::new();
    let mut with = Vec::new();
    let mut last_status = None;
    for n in 0..runs {
        // Interleave so that machine-load drift hits both sides alike.
        let s = boot_once(&a, &img, false, smp, n, None)?;
        println!("run {n}: without thinhv {:.2} s", s.secs);
        native.push(s.secs);
        let s = boot_once(&a, &img, true, smp, n, None)?;
        println!("run {n}: with thinhv    {:.2} s", s.secs);
        with.push(s.secs);
        if s.status.is_some() {
            last_status = s.status;
        }
    }
    // PCI mediation: an igb PF behind a root port, with thinhv, without
    // and with a VF budget (its ECAM page and the 0xCFC ports trapped).
    const IGB: [&str; 6] = qemu::IGB_BEHIND_ROOT_PORT;
    let budget = "\n[[sriov]]\ndevice = \"8086:10c9\"\nos_vfs = 2\n";
    let mut igb_plain = Vec::new();
    let mut igb_budget = Vec::new();
    let mut budget_status = None;
    for n in 0..runs {
        let s = boot_once(&a, &img, true, smp, n, Some(("-igb", &IGB, "", "")))?;
        println!("run {n}: igb machine, thinhv, no rules {:.2} s", s.secs);
        igb_plain.push(s.secs);
        let s = boot_once(
            &a,
            &img,
            true,
            smp,
            n,
            Some(("-igb-budget", &IGB, budget, "")),
        )?;
        println!("run {n}: igb machine, thinhv, VF budget {:.2} s", s.secs);
        igb_budget.push(s.secs);
        if s.status.is_some() {
            budget_status = s.status;
        }
    }
    let mut nvme_native = Vec::new();
    let mut nvme_with = Vec::new();
    for n in 0..runs {
        let s = nvme_once(&a, &img, false, n)?;
        println!("run {n}: NVMe 512 MiB without thinhv {s:.2} s");
        nvme_native.push(s);
        let s = nvme_once(&a, &img, true, n)?;
        println!("run {n}: NVMe 512 MiB with thinhv+IOMMU {s:.2} s");
        nvme_with.push(s);
    }
    let (nn, nw) = (
        median(&mut nvme_native.clone()),
        median(&mut nvme_with.clone()),
    );
    let (mn, mw) = (median(&mut native.clone()), median(&mut with.clone()));
    let status = last_status.ok_or("the guest did not report thinhv's status")?;
    let efi_size = std::fs::metadata(&a.efi).map_or(0, |m| m.len());
    let core_size = std::fs::metadata(&a.core).map_or(0, |m| m.len());
    println!();
    println!("thinhv bench: QEMU TCG, q35, -cpu max, -smp {smp}, 1024 MiB; median of {runs} runs");
    println!("  boot to Linux userspace without thinhv: {mn:6.2} s   {native:.2?}");
    println!("  boot to Linux userspace with thinhv:    {mw:6.2} s   {with:.2?}");
    println!("  ratio (with / without):                 {:6.3}", mw / mn);
    println!(
        "  NVMe sequential read (q35 + intel-iommu, 512 MiB, O_DIRECT, 1 MiB blocks, median):"
    );
    println!(
        "    without thinhv:            {:7.1} MiB/s   {nvme_native:.2?} s",
        512.0 / nn
    );
    println!(
        "    with thinhv owning VT-d:   {:7.1} MiB/s   {nvme_with:.2?} s",
        512.0 / nw
    );
    println!("    ratio (with / without):    {:7.3}", nn / nw);
    println!("  exit round trips measured in the guest (EFI probe, TSC cycles, median):");
    for (what, bare, hv, handler) in [
        ("CPUID", trips[0], trips[1], trips[4]),
        ("APIC write", trips[2], trips[3], trips[5]),
    ] {
        println!(
            "    {what:<11} bare {bare:8.0}   under thinhv {hv:8.0}   of which thinhv's handler \
             {handler:8.0}, world switch and the emulator's exit {:8.0}",
            hv - bare - handler
        );
    }
    println!("  exits during the boot (all CPUs, counted until userspace):");
    let mut total = 0u64;
    if let Some(ex) = status.get("exits_total").and_then(Value::as_object) {
        for (k, v) in ex {
            let n = v.as_u64().unwrap_or(0);
            total += n;
            if n > 0 {
                println!("    {k:<18} {n:>10}");
            }
        }
    }
    println!("    {:<18} {total:>10}", "total");
    let (mp, mb) = (
        median(&mut igb_plain.clone()),
        median(&mut igb_budget.clone()),
    );
    let pci_exits = budget_status
        .as_ref()
        .and_then(|s| s.get("exits_total"))
        .and_then(|e| e.get("pci_config"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    println!("  PCI mediation (igb behind a root port, thinhv, median):");
    println!("    no rules:                  {mp:6.2} s   {igb_plain:.2?}");
    println!("    [[sriov]] os_vfs = 2:      {mb:6.2} s   {igb_budget:.2?}");
    println!("    ratio (budget / no rules): {:6.3}", mb / mp);
    println!("    mediated configuration accesses during the boot: {pci_exits}");
    let reserved = status
        .get("bytes_reserved")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    println!(
        "  memory reserved from the OS:            {reserved} bytes ({} KiB)",
        reserved / 1024
    );
    println!("    (reference: Hyper-V's 32 MiB for the first GiB of guest memory)");
    println!(
        "  thinhv.efi:                             {efi_size} bytes (core ELF {core_size} bytes)"
    );
    let out = serde_json::json!({
        "smp": smp, "runs": runs,
        "boot_without_s": native, "boot_with_s": with,
        "median_without_s": mn, "median_with_s": mw, "ratio": mw / mn,
        "exits_total": status.get("exits_total"), "bytes_reserved": reserved,
        "efi_size": efi_size, "core_elf_size": core_size,
        "nvme_read_512m_without_s": nvme_native, "nvme_read_512m_with_s": nvme_with,
        "nvme_throughput_ratio": nn / nw,
        "igb_boot_no_rules_s": igb_plain, "igb_boot_vf_budget_s": igb_budget,
        "igb_vf_budget_pci_config_exits": pci_exits,
        "cpuid_round_trip_cycles_bare": trips[0], "cpuid_round_trip_cycles_thinhv": trips[1],
        "apic_write_round_trip_cycles_bare": trips[2],
        "apic_write_round_trip_cycles_thinhv": trips[3],
        "cpuid_handler_cycles": trips[4], "apic_write_handler_cycles": trips[5],
        "appliances": appliances,
    });
    save("bench.json", &out)
}

/// Writes `figures` to `build/{name}` and says where.
fn save(name: &str, figures: &Value) -> Result<(), String> {
    let path = root().join("build").join(name);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(figures).unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    println!("  (also in {})", path.display());
    Ok(())
}
