//! How the previous run ended, from the evidence: the shutdown marker (with its
//! heartbeat), the crash spool, the boot id and the cgroup OOM-kill count.
//!
//! The rules, in order:
//! 1. No marker: the first run. A `clean` marker: a clean end.
//! 2. A spool record of an event the run did not outlive is the cause. A record
//!    is outlived when a heartbeat was written after it: the heartbeat keeps quiet
//!    for a grace period after every incident, so a heartbeat after a record proves
//!    the process went on (a caught panic, a handled `try_reserve` failure). A
//!    supervised-task panic is always outlived (the task's failure was handled).
//!    Among the records not outlived, first match wins: an allocation failure →
//!    `OutOfMemory`; a SIGSEGV/SIGBUS next to the stack pointer → `StackOverflow`;
//!    a panic → `ApplicationCrash` (`panic`); any other fatal signal →
//!    `ApplicationCrash` (the signal).
//! 3. No such record: the boot id changed → `PowerFailure`; the same boot and the
//!    cgroup `oom_kill` count rose → `OutOfMemory` (a kernel OOM kill); the same
//!    boot otherwise → `ApplicationCrash` (`killed`: SIGKILL or an exit without a
//!    clean shutdown); boot ids not comparable or the marker damaged → `Unknown`.
//!
//! `SystemCrash` is never inferred from local evidence alone: a kernel crash and a
//! power loss look the same from the next boot. `crashed_at` is the fatal record's
//! time, else the run's last sign of life (its last heartbeat, else its start).

use std::time::Duration;

use sanare_core::{CrashId, CrashKind, Severity};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::marker::{Marker, MarkerState};
use crate::spool::{RecordSource, SpoolProblem, SpoolRecord};
use crate::types::{CrashRecord, PreviousOutcome, PreviousRun, SystemState};

/// Host facts read at detection.
pub(crate) struct Facts {
    pub(crate) boot_id: Option<String>,
    pub(crate) oom_kill: Option<u64>,
}

pub(crate) fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGTRAP => "SIGTRAP".into(),
        other => format!("signal {other}"),
    }
}

pub(crate) fn ms_to_time(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// A stable identity for a run whose marker carries no run id (a damaged marker,
/// or one written by an older release): derived from the bytes of the marker and
/// the spool, so reading the same evidence twice gives the same id (and the same
/// crash is recorded once). Four CRC-32C lanes with different seeds fill the 128
/// bits; the version nibble says "custom" (8) and the variant is RFC 4122.
pub(crate) fn content_run_id(marker: &[u8], spool: &[u8]) -> Uuid {
    let mut bytes = [0u8; 16];
    for (lane, seed) in [0x5a4e_5201u32, 0x9e37_79b9, 0x85eb_ca6b, 0xc2b2_ae35]
        .into_iter()
        .enumerate()
    {
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed, marker), spool);
        bytes[lane * 4..lane * 4 + 4].copy_from_slice(&crc.to_be_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

fn system_state(marker: Option<&Marker>, facts: &Facts) -> SystemState {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |key: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
    };
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split('.').next()?.parse().ok());
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        });
    SystemState {
        previous_boot_id: marker.map(|m| m.boot_id.clone()).filter(|b| !b.is_empty()),
        boot_id: facts.boot_id.clone(),
        previous_pid: marker.map(|m| m.pid),
        previous_version: marker.map(|m| m.version.clone()).filter(|v| !v.is_empty()),
        previous_started_at: marker.and_then(|m| ms_to_time(m.started_unix_ms)),
        previous_heartbeat_at: marker.and_then(|m| m.heartbeat_unix_ms.and_then(ms_to_time)),
        oom_kill_at_start: marker.and_then(|m| m.oom_kill),
        oom_kill_now: facts.oom_kill,
        uptime_s: uptime,
        mem_total_kib: mem("MemTotal"),
        mem_available_kib: mem("MemAvailable"),
        threads,
    }
}

/// Classifies the previous run (rules in the module docs). `content_id` is the
/// run's identity when the marker carries none ([`content_run_id`]).
pub(crate) fn classify(
    marker_text: Option<&str>,
    records: Vec<SpoolRecord>,
    spool_problems: Vec<SpoolProblem>,
    facts: &Facts,
    content_id: Uuid,
) -> PreviousRun {
    let mut run = PreviousRun {
        outcome: PreviousOutcome::Crashed,
        crash: None,
        run_id: None,
        records,
        fatal_record: None,
        spool_problems,
        detection_time: Duration::ZERO,
    };
    let marker = match marker_text.map(Marker::decode) {
        None => {
            run.outcome = PreviousOutcome::FirstRun;
            return run;
        }
        Some(Ok(m)) => Some(m),
        Some(Err(_)) => None,
    };
    let run_id = marker.as_ref().and_then(|m| m.run_id).unwrap_or(content_id);
    run.run_id = Some(run_id);
    if marker
        .as_ref()
        .is_some_and(|m| m.state == MarkerState::Clean)
    {
        run.outcome = PreviousOutcome::Clean;
        return run;
    }
    let now = sanare_core::now();
    let mut crash = CrashRecord {
        id: CrashId::from_uuid(run_id),
        kind: CrashKind::Unknown,
        severity: Severity::High,
        crashed_at: marker
            .as_ref()
            .and_then(|m| ms_to_time(m.last_sign_of_life_ms()))
            .unwrap_or(now),
        detected_at: now,
        exception_type: None,
        message: None,
        location: None,
        backtrace: None,
        signal: None,
        fault_address: None,
        thread: None,
        affected_components: Vec::new(),
        evidence: Vec::new(),
        system_state: system_state(marker.as_ref(), facts),
        spool_problems: run.spool_problems.clone(),
    };
    crash.evidence.push(if marker.is_some() {
        "the shutdown marker says the previous run was still running".into()
    } else {
        "the shutdown marker is damaged, so the previous run's end is unknown".into()
    });
    for r in &run.records {
        if r.source == RecordSource::TaskPanic && !crash.affected_components.contains(&r.thread) {
            crash.affected_components.push(r.thread.clone());
        }
    }
    let heartbeat = marker.as_ref().and_then(|m| m.heartbeat_unix_ms);
    let outlived = |r: &SpoolRecord| {
        r.source == RecordSource::TaskPanic || heartbeat.is_some_and(|h| h > r.unix_ms)
    };
    let fatal = |pred: &dyn Fn(&SpoolRecord) -> bool| {
        run.records
            .iter()
            .enumerate()
            .rev()
            .find(|(_, r)| !outlived(r) && pred(r))
            .map(|(i, _)| i)
    };
    let cause = fatal(&|r| r.source == RecordSource::AllocFailure)
        .or_else(|| fatal(&|r| r.source == RecordSource::Signal && r.stack_overflow))
        .or_else(|| fatal(&|r| r.source == RecordSource::Panic))
        .or_else(|| fatal(&|r| r.source == RecordSource::Signal));
    let boot_changed = match (&facts.boot_id, marker.as_ref()) {
        (Some(now), Some(m)) if !m.boot_id.is_empty() => Some(*now != m.boot_id),
        _ => None,
    };
    match cause {
        Some(i) => {
            let signal =
                fatal(&|r| r.source == RecordSource::Signal).map(|s| run.records[s].signal);
            from_record(&mut crash, &run.records[i], signal);
            run.fatal_record = Some(i);
            if boot_changed == Some(true) {
                crash.evidence.push(
                    "the boot id changed too: the host restarted after the process died".into(),
                );
            }
        }
        None => from_marker(&mut crash, marker.as_ref(), boot_changed, facts),
    }
    let survived = run
        .records
        .iter()
        .filter(|r| r.source != RecordSource::TaskPanic && outlived(r))
        .count();
    if survived > 0 {
        crash.evidence.push(format!(
            "{survived} earlier incident(s) (a caught panic, a handled allocation failure) were followed by a heartbeat: the run went on after them"
        ));
    }
    if !run.spool_problems.is_empty() {
        crash.evidence.push(format!(
            "{} damaged spool region(s) were skipped",
            run.spool_problems.len()
        ));
    }
    run.crash = Some(crash);
    run
}

/// The crash as the record of its fatal event says.
fn from_record(crash: &mut CrashRecord, r: &SpoolRecord, signal: Option<i32>) {
    crash.severity = Severity::High;
    if let Some(t) = ms_to_time(r.unix_ms) {
        crash.crashed_at = t;
    }
    match r.source {
        RecordSource::AllocFailure => {
            crash.kind = CrashKind::OutOfMemory;
            crash.exception_type = Some("allocation failure".into());
            crash.message = Some(format!(
                "memory allocation of {} bytes failed",
                r.alloc_size
            ));
            crash
                .evidence
                .push("the allocator recorded a failed allocation".into());
        }
        RecordSource::Signal if r.stack_overflow => {
            crash.kind = CrashKind::StackOverflow;
            crash.exception_type = Some(signal_name(r.signal));
            crash.signal = Some(r.signal);
            crash.fault_address = Some(r.fault_address);
            crash.message = Some(format!(
                "stack overflow: {} at {:#x}, next to the stack pointer",
                signal_name(r.signal),
                r.fault_address
            ));
            crash
                .evidence
                .push("a fatal signal's fault address was in the stack guard area".into());
        }
        RecordSource::Panic => {
            crash.kind = CrashKind::ApplicationCrash;
            crash.exception_type = Some("panic".into());
            crash.message = Some(r.message.clone());
            crash.location = Some(r.location.clone()).filter(|l| !l.is_empty());
            crash.backtrace = Some(r.backtrace.clone()).filter(|b| !b.is_empty());
            crash.thread = Some(r.thread.clone());
            crash.signal = signal;
            crash
                .evidence
                .push("the panic hook recorded a panic".into());
        }
        _ => {
            crash.kind = CrashKind::ApplicationCrash;
            crash.exception_type = Some(signal_name(r.signal));
            crash.signal = Some(r.signal);
            crash.fault_address = (r.fault_address != 0).then_some(r.fault_address);
            crash.message = Some(format!("fatal signal {}", signal_name(r.signal)));
            crash
                .evidence
                .push("the signal handler recorded a fatal signal".into());
        }
    }
}

/// The crash as the marker, the boot id and the OOM-kill count say, when no
/// record explains it.
fn from_marker(
    crash: &mut CrashRecord,
    marker: Option<&Marker>,
    boot_changed: Option<bool>,
    facts: &Facts,
) {
    let Some(m) = marker else {
        return;
    };
    let oom_rose =
        matches!((m.oom_kill, facts.oom_kill), (Some(before), Some(now)) if now > before);
    match boot_changed {
        Some(true) => {
            crash.kind = CrashKind::PowerFailure;
            crash.severity = Severity::Critical;
            crash.exception_type = Some("host went down".into());
            crash.message = Some(
                "the machine restarted while the service was running (power loss or host crash)"
                    .into(),
            );
            crash.evidence.push(format!(
                "the boot id changed from {} to {}",
                m.boot_id,
                facts.boot_id.as_deref().unwrap_or("?")
            ));
        }
        Some(false) if oom_rose => {
            crash.kind = CrashKind::OutOfMemory;
            crash.exception_type = Some("kernel OOM kill".into());
            crash.message = Some("the kernel's OOM killer ended the process".into());
            crash.evidence.push(format!(
                "the cgroup oom_kill count rose from {} to {}",
                m.oom_kill.unwrap_or(0),
                facts.oom_kill.unwrap_or(0)
            ));
        }
        Some(false) => {
            crash.kind = CrashKind::ApplicationCrash;
            crash.exception_type = Some("killed".into());
            crash.message = Some(
                "the process was killed by a signal no handler sees (SIGKILL) or exited without a clean shutdown"
                    .into(),
            );
            crash
                .evidence
                .push("same boot id, no crash record, no new OOM kill in the cgroup".into());
        }
        None => {
            crash.kind = CrashKind::Unknown;
            crash
                .evidence
                .push("no crash record and the boot id could not be compared".into());
        }
    }
    if m.heartbeat_unix_ms.is_some() {
        crash
            .evidence
            .push("the time of the crash is the run's last heartbeat".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: i64 = 1_700_000_000_000;

    fn marker(boot: &str, oom: Option<u64>, heartbeat: Option<i64>) -> Marker {
        Marker {
            state: MarkerState::Running,
            pid: 1,
            boot_id: boot.into(),
            started_unix_ms: START,
            oom_kill: oom,
            version: "v".into(),
            run_id: Some(Uuid::from_u128(7)),
            heartbeat_unix_ms: heartbeat,
        }
    }

    fn running(boot: &str, oom: Option<u64>) -> String {
        marker(boot, oom, None).encode()
    }

    fn facts(boot: &str, oom: Option<u64>) -> Facts {
        Facts {
            boot_id: Some(boot.into()),
            oom_kill: oom,
        }
    }

    fn rec_at(source: RecordSource, signal: i32, overflow: bool, unix_ms: i64) -> SpoolRecord {
        SpoolRecord {
            source,
            stack_overflow: overflow,
            signal,
            fault_address: 0x1000,
            unix_ms,
            pid: 1,
            tid: 1,
            alloc_size: 64,
            message: "m".into(),
            location: "l".into(),
            thread: "t".into(),
            backtrace: String::new(),
        }
    }

    fn rec(source: RecordSource, signal: i32, overflow: bool) -> SpoolRecord {
        rec_at(source, signal, overflow, START + 1_000)
    }

    fn go(marker: Option<&str>, records: Vec<SpoolRecord>, f: &Facts) -> PreviousRun {
        classify(marker, records, vec![], f, Uuid::from_u128(99))
    }

    fn kind(run: &PreviousRun) -> CrashKind {
        run.crash.as_ref().map(|c| c.kind).unwrap()
    }

    #[test]
    fn classification_rules() {
        let f = facts("a", Some(1));
        assert_eq!(go(None, vec![], &f).outcome, PreviousOutcome::FirstRun);
        let mut clean = marker("a", Some(1), None);
        clean.state = MarkerState::Clean;
        let run = go(
            Some(&clean.encode()),
            vec![rec(RecordSource::TaskPanic, 0, false)],
            &f,
        );
        assert_eq!(run.outcome, PreviousOutcome::Clean);
        assert_eq!(run.records.len(), 1);
        assert_eq!(run.run_id, Some(Uuid::from_u128(7)));

        let m = running("a", Some(1));
        let r = |v| go(Some(&m), v, &f);
        assert_eq!(kind(&r(vec![])), CrashKind::ApplicationCrash);
        assert_eq!(
            kind(&r(vec![rec(RecordSource::Signal, libc::SIGSEGV, true)])),
            CrashKind::StackOverflow
        );
        let oom = r(vec![
            rec(RecordSource::AllocFailure, 0, false),
            rec(RecordSource::Signal, libc::SIGABRT, false),
        ]);
        assert_eq!(kind(&oom), CrashKind::OutOfMemory);
        assert_eq!(oom.fatal_record, Some(0));
        let panic = r(vec![
            rec(RecordSource::Panic, 0, false),
            rec(RecordSource::Signal, libc::SIGABRT, false),
        ]);
        assert_eq!(kind(&panic), CrashKind::ApplicationCrash);
        let c = panic.crash.as_ref().unwrap();
        assert_eq!(c.exception_type.as_deref(), Some("panic"));
        assert_eq!(c.signal, Some(libc::SIGABRT));
        assert_eq!(c.crashed_at, ms_to_time(START + 1_000).unwrap());
        let task = r(vec![rec(RecordSource::TaskPanic, 0, false)]);
        assert_eq!(task.crash.as_ref().unwrap().affected_components, vec!["t"]);
        assert_eq!(task.fatal_record, None, "a task panic is never the cause");

        assert_eq!(
            kind(&go(Some(&m), vec![], &facts("b", Some(1)))),
            CrashKind::PowerFailure
        );
        assert_eq!(
            kind(&go(Some(&m), vec![], &facts("a", Some(2)))),
            CrashKind::OutOfMemory
        );
        // no cgroup readable: degrade to "killed"
        assert_eq!(
            kind(&go(Some(&m), vec![], &facts("a", None))),
            CrashKind::ApplicationCrash
        );
        let no_boot = Facts {
            boot_id: None,
            oom_kill: None,
        };
        assert_eq!(kind(&go(Some(&m), vec![], &no_boot)), CrashKind::Unknown);
        let damaged = go(Some("SANARE-MARKER 1\nstate="), vec![], &f);
        assert_eq!(kind(&damaged), CrashKind::Unknown);
    }

    #[test]
    fn an_incident_the_run_outlived_does_not_hide_a_later_power_loss_or_kill() {
        let panic_at = START + 10_000;
        let beat = |h| marker("a", Some(1), Some(h)).encode();
        // A caught panic, then a heartbeat, then the power went.
        let run = go(
            Some(&beat(panic_at + 2_000)),
            vec![rec_at(RecordSource::Panic, 0, false, panic_at)],
            &facts("b", Some(1)),
        );
        let crash = run.crash.as_ref().unwrap();
        assert_eq!(crash.kind, CrashKind::PowerFailure);
        assert_eq!(run.fatal_record, None);
        assert_eq!(crash.crashed_at, ms_to_time(panic_at + 2_000).unwrap());
        assert!(
            crash
                .evidence
                .iter()
                .any(|e| e.contains("1 earlier incident")),
            "{:?}",
            crash.evidence
        );
        // A handled allocation failure, a heartbeat, then a kill -9: not OOM.
        let run = go(
            Some(&beat(panic_at + 2_000)),
            vec![rec_at(RecordSource::AllocFailure, 0, false, panic_at)],
            &facts("a", Some(1)),
        );
        assert_eq!(kind(&run), CrashKind::ApplicationCrash);
        assert_eq!(run.crash.unwrap().exception_type.as_deref(), Some("killed"));
        // A heartbeat before (or at) the record proves nothing: the panic is the cause.
        for h in [panic_at - 2_000, panic_at] {
            let run = go(
                Some(&beat(h)),
                vec![rec_at(RecordSource::Panic, 0, false, panic_at)],
                &facts("b", Some(1)),
            );
            assert_eq!(kind(&run), CrashKind::ApplicationCrash, "heartbeat {h}");
            assert_eq!(run.fatal_record, Some(0));
            assert!(
                run.crash
                    .unwrap()
                    .evidence
                    .iter()
                    .any(|e| e.contains("boot id changed too"))
            );
        }
        // Without any record, the crash time is the last heartbeat, not the start.
        let run = go(
            Some(&beat(START + 86_400_000)),
            vec![],
            &facts("a", Some(1)),
        );
        assert_eq!(
            run.crash.unwrap().crashed_at,
            ms_to_time(START + 86_400_000).unwrap()
        );
    }

    #[test]
    fn the_crash_id_is_the_run_id_or_a_stable_digest_of_the_evidence() {
        let f = facts("a", Some(1));
        let run = go(Some(&running("a", Some(1))), vec![], &f);
        assert_eq!(
            run.crash.unwrap().id,
            CrashId::from_uuid(Uuid::from_u128(7))
        );
        let a = content_run_id(b"SANARE-MARKER 1\nstate=", b"spool");
        assert_eq!(a, content_run_id(b"SANARE-MARKER 1\nstate=", b"spool"));
        assert_ne!(a, content_run_id(b"SANARE-MARKER 1\nstate=", b"spool2"));
        assert_ne!(a, content_run_id(b"SANARE-MARKER 1\nstate=x", b"spool"));
        assert_eq!(a.get_version_num(), 8);
        let damaged = classify(Some("garbage"), vec![], vec![], &f, a);
        assert_eq!(damaged.crash.unwrap().id, CrashId::from_uuid(a));
    }
}
