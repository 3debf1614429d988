//! Hypercalls (see `thinhv_abi::hypercall` for the ABI).
use super::{Outcome, advance_or_fault};
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu};
use crate::guest_mem::check_buffer;
use core::sync::atomic::Ordering;
use thinhv_abi::hypercall::{Function, Status};
use zerocopy::IntoBytes;

fn finish(
    cpu: &mut impl GuestCpu,
    env: &impl Env,
    status: Status,
    out: [Option<u64>; 3],
) -> Outcome {
    cpu.set_gpr(Gpr::Rax, status.0);
    for (r, v) in [Gpr::Rbx, Gpr::Rcx, Gpr::Rdx].into_iter().zip(out) {
        if let Some(v) = v {
            cpu.set_gpr(r, v);
        }
    }
    advance_or_fault(cpu, env)
}

pub(super) fn handle(cpu: &mut impl GuestCpu, env: &mut impl Env) -> Outcome {
    // Any hypercall is an occasion to collect DMA faults (and to report
    // the OS's own to it).
    env.iommu_poll();
    super::os_iommu::deliver_faults(env);
    let func = Function(cpu.gpr(Gpr::Rax));
    let (a0, a1, a2) = (cpu.gpr(Gpr::Rbx), cpu.gpr(Gpr::Rcx), cpu.gpr(Gpr::Rdx));
    if cpu.cpl() != 0 {
        log::debug!(
            "cpu {}: hypercall {} from CPL {} refused",
            env.cpu_index(),
            func.name(),
            cpu.cpl()
        );
        return finish(cpu, env, Status::NOT_PERMITTED, [None; 3]);
    }
    let hv = env.hv();
    // Buffers are checked against the OS's RAM; an appliance has only the
    // version call (and nothing of the hypervisor's state to read).
    if !hv.space_of(env.cpu_index()).is_os() && func != Function::VERSION {
        return finish(cpu, env, Status::NOT_PERMITTED, [None; 3]);
    }
    match func {
        Function::VERSION => {
            let n = u64::from(hv.cpus_virtualized.load(Ordering::Relaxed));
            finish(
                cpu,
                env,
                Status::OK,
                [
                    Some(u64::from(thinhv_abi::VERSION)),
                    Some(u64::from(thinhv_abi::ABI_VERSION)),
                    Some(n),
                ],
            )
        }
        Function::STATUS => {
            let report = env.status_report();
            let bytes = report.as_bytes();
            let need = bytes.len() as u64;
            if a1 < need {
                return finish(cpu, env, Status::BUFFER_TOO_SMALL, [Some(need), None, None]);
            }
            if let Err(s) = check_buffer(hv, a0, need) {
                return finish(cpu, env, s, [None; 3]);
            }
            env.write_phys(a0, bytes);
            finish(cpu, env, Status::OK, [Some(need), None, None])
        }
        Function::LOG_READ => {
            if let Err(s) = check_buffer(hv, a0, a1) {
                return finish(cpu, env, s, [None; 3]);
            }
            let mut chunk = [0u8; 512];
            let mut pos = a2;
            let mut done = 0u64;
            let head = loop {
                let want = usize::try_from(a1 - done)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                let (n, next, head) = env.log_read(pos, &mut chunk[..want]);
                pos = next;
                if n == 0 {
                    break head;
                }
                env.write_phys(a0 + done, &chunk[..n]);
                done += n as u64;
                if done >= a1 {
                    break head;
                }
            };
            finish(cpu, env, Status::OK, [Some(done), Some(pos), Some(head)])
        }
        Function::INTEGRITY => {
            let i = env.integrity();
            let ok = i.expected_crc == i.current_crc && i.canary_ok;
            let status = if ok {
                Status::OK
            } else {
                Status::INTEGRITY_FAILURE
            };
            if !ok {
                log::error!(
                    "integrity check failed: crc {:#010x} expected {:#010x}, canary {}",
                    i.current_crc,
                    i.expected_crc,
                    if i.canary_ok { "intact" } else { "changed" }
                );
            }
            finish(
                cpu,
                env,
                status,
                [
                    Some(u64::from(i.expected_crc)),
                    Some(u64::from(i.current_crc)),
                    Some(u64::from(i.canary_ok)),
                ],
            )
        }
        Function::EXIT_COUNTS => {
            let Ok(idx) = usize::try_from(a2) else {
                return finish(cpu, env, Status::INVALID_ARGUMENT, [None; 3]);
            };
            let Some(counts) = env.exit_counts(idx) else {
                return finish(cpu, env, Status::INVALID_ARGUMENT, [None; 3]);
            };
            let bytes = counts.as_bytes();
            let need = bytes.len() as u64;
            if a1 < need {
                return finish(cpu, env, Status::BUFFER_TOO_SMALL, [Some(need), None, None]);
            }
            if let Err(s) = check_buffer(hv, a0, need) {
                return finish(cpu, env, s, [None; 3]);
            }
            env.write_phys(a0, bytes);
            finish(cpu, env, Status::OK, [Some(need), None, None])
        }
        Function::EXIT_COST => {
            let Some(slot) = usize::try_from(a2).ok().and_then(|i| hv.cpus().get(i)) else {
                return finish(cpu, env, Status::INVALID_ARGUMENT, [None; 3]);
            };
            let (cycles, exits) = slot.exit_cost();
            finish(cpu, env, Status::OK, [Some(cycles), Some(exits), None])
        }
        Function::DEVIRTUALIZE => {
            if hv.is_sealed() {
                return finish(cpu, env, Status::NOT_PERMITTED, [None; 3]);
            }
            let o = finish(cpu, env, Status::OK, [None; 3]);
            if o == Outcome::Resume {
                Outcome::Devirtualize
            } else {
                o
            }
        }
        Function::SEAL => {
            if hv.sealed.swap(true, Ordering::SeqCst) {
                return finish(cpu, env, Status::NOT_PERMITTED, [None; 3]);
            }
            log::info!("sealed: the OS is being started; loader-only hypercalls are closed");
            let (on, total) = env.iommu_enable();
            // How many units the OS has of its own (the loader shows it
            // their DMAR only then).
            let os_units = env.hv().os_unit_count.load(Ordering::SeqCst) as u64;
            finish(
                cpu,
                env,
                Status::OK,
                [Some(u64::from(on)), Some(u64::from(total)), Some(os_units)],
            )
        }
        Function::CLAIM_APPLIANCE_CPUS => {
            if !hv.is_sealed() || !hv.space_of(env.cpu_index()).is_os() {
                return finish(cpu, env, Status::NOT_PERMITTED, [None; 3]);
            }
            let n = super::partition::claim_cpus(env);
            finish(cpu, env, Status::OK, [Some(n), None, None])
        }
        Function::DEBUG_HOST_FAULT => {
            if hv.is_sealed() || hv.config.debug_host_fault == 0 {
                return finish(cpu, env, Status::NOT_PERMITTED, [None; 3]);
            }
            log::warn!("[debug] host_fault: raising an exception in host mode on purpose");
            let o = finish(cpu, env, Status::OK, [None; 3]);
            if o == Outcome::Resume {
                Outcome::HostFaultTest
            } else {
                o
            }
        }
        _ => finish(cpu, env, Status::UNKNOWN_FUNCTION, [None; 3]),
    }
}
