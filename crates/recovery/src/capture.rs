//! Crash capture: everything that runs while the process is dying.
//!
//! Global state is limited to a few atomics and one pre-allocated buffer, set up by
//! [`crate::CrashDetector::install_handlers`]: the spool's file descriptor (opened at
//! install time, `O_APPEND`), and a static record buffer the signal handler and the
//! allocator format into. The crash paths call only async-signal-safe functions
//! (`write`, `fsync`, `clock_gettime`, `gettid`, `getpid`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

use crate::spool::{self, RawRecord, RecordSource};

/// The spool's descriptor, or -1 when capture is not installed.
static SPOOL_FD: AtomicI32 = AtomicI32::new(-1);
/// Set once an allocation failed (see [`SanareAllocator`]).
static ALLOC_FAILED: AtomicBool = AtomicBool::new(false);
/// When the last incident (panic, allocation failure, fatal signal) was captured, in
/// ms since the Unix epoch.
static LAST_INCIDENT_MS: AtomicI64 = AtomicI64::new(i64::MIN);

/// How long after an incident the heartbeat stays silent. A heartbeat written after
/// an incident is the evidence that the process survived it (a caught panic, a
/// handled `try_reserve` failure), so none may be written while the process could
/// still be dying of it (printing the panic, unwinding, aborting).
pub(crate) const INCIDENT_GRACE_MS: i64 = 1_000;

/// Notes that an incident was just captured. Async-signal-safe (one atomic store).
pub(crate) fn note_incident() {
    LAST_INCIDENT_MS.store(now_unix_ms(), Ordering::SeqCst);
}

/// Whether a heartbeat taken at `now_ms` may be written: no incident was captured
/// within [`INCIDENT_GRACE_MS`] before it.
pub(crate) fn heartbeat_allowed(now_ms: i64) -> bool {
    now_ms
        >= LAST_INCIDENT_MS
            .load(Ordering::SeqCst)
            .saturating_add(INCIDENT_GRACE_MS)
}

const CRASH_BUF_LEN: usize = 8192;

struct CrashBuf {
    busy: AtomicBool,
    buf: UnsafeCell<[u8; CRASH_BUF_LEN]>,
}

// SAFETY: `buf` is only touched by the holder of `busy`.
unsafe impl Sync for CrashBuf {}

static CRASH_BUF: CrashBuf = CrashBuf {
    busy: AtomicBool::new(false),
    buf: UnsafeCell::new([0; CRASH_BUF_LEN]),
};

pub(crate) fn set_spool_fd(fd: i32) -> i32 {
    SPOOL_FD.swap(fd, Ordering::SeqCst)
}

/// Whether an allocation failed in this process (only with [`SanareAllocator`]).
pub fn allocation_failed() -> bool {
    ALLOC_FAILED.load(Ordering::Relaxed)
}

pub(crate) fn now_unix_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime is async-signal-safe and writes only `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec.saturating_mul(1000) + ts.tv_nsec / 1_000_000
}

pub(crate) fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Writes `bytes` to `fd` with raw `write` calls and `fsync`s it. Async-signal-safe.
fn write_durably(fd: i32, bytes: &[u8]) -> bool {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: the pointer and length describe the live slice.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        if n == 0 {
            return false;
        }
        done += n as usize;
    }
    // SAFETY: fsync on a descriptor we own.
    unsafe { libc::fsync(fd) == 0 }
}

/// Formats `rec` into the static buffer and writes it to the spool. Never allocates
/// and never blocks: if another thread holds the buffer (two crashes at once, or a
/// crash inside the writer), it spins briefly and then gives up.
pub(crate) fn write_record_static(rec: &RawRecord<'_>) -> bool {
    let fd = SPOOL_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return false;
    }
    let mut spins = 0u32;
    while CRASH_BUF
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins > 1_000_000 {
            return false;
        }
        std::hint::spin_loop();
    }
    // SAFETY: we hold `busy`, so nobody else touches the buffer.
    let buf = unsafe { &mut *CRASH_BUF.buf.get() };
    let n = spool::encode_into(buf, rec);
    let ok = n > 0 && write_durably(fd, &buf[..n]);
    CRASH_BUF.busy.store(false, Ordering::Release);
    ok
}

/// Formats into a heap buffer (for the panic hook and task failures, which run in a
/// normal context) and writes it to the spool.
pub(crate) fn write_record_heap(rec: &RawRecord<'_>) -> bool {
    let fd = SPOOL_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return false;
    }
    let len = spool::FRAME_LEN
        + spool::FIXED_BODY_LEN
        + 16
        + rec.message.len()
        + rec.location.len()
        + rec.thread.len()
        + rec.backtrace.len().min(64 * 1024);
    let mut buf = vec![0u8; len];
    let n = spool::encode_into(&mut buf, rec);
    n > 0 && write_durably(fd, &buf[..n])
}

pub(crate) fn panic_record_hook(info: &std::panic::PanicHookInfo<'_>, capture_backtrace: bool) {
    note_incident();
    let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = info.payload().downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    };
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let thread_name = thread.name().unwrap_or("<unnamed>").to_owned();
    let backtrace = if capture_backtrace {
        std::backtrace::Backtrace::force_capture().to_string()
    } else {
        String::new()
    };
    write_record_heap(&RawRecord {
        source: RecordSource::Panic,
        flags: 0,
        signal: 0,
        fault_address: 0,
        unix_ms: now_unix_ms(),
        pid: std::process::id(),
        tid: gettid(),
        alloc_size: 0,
        message: message.as_bytes(),
        location: location.as_bytes(),
        thread: thread_name.as_bytes(),
        backtrace: backtrace.as_bytes(),
    });
    // Capturing the backtrace may take a while: the grace counts from here.
    note_incident();
}

/// Records that a supervised task of `component` ended in a panic. The process lives
/// on, so this is a component failure, not a process death; the next start lists it
/// among the previous run's incidents.
pub fn record_task_panic(component: &str, error: &tokio::task::JoinError) -> bool {
    if !error.is_panic() {
        return false;
    }
    let message = format!("task of component `{component}` panicked: {error}");
    metrics::counter!("sanare_recovery_task_panics_total").increment(1);
    tracing::error!(component, %error, "supervised task panicked");
    write_record_heap(&RawRecord {
        source: RecordSource::TaskPanic,
        flags: 0,
        signal: 0,
        fault_address: 0,
        unix_ms: now_unix_ms(),
        pid: std::process::id(),
        tid: gettid(),
        alloc_size: 0,
        message: message.as_bytes(),
        location: b"",
        thread: component.as_bytes(),
        backtrace: b"",
    })
}

/// Spawns `future` as a supervised tokio task of `component`: if it panics, the
/// panic is recorded with [`record_task_panic`] and the handle yields the
/// `JoinError`.
pub fn spawn_supervised<F>(
    component: &'static str,
    future: F,
) -> tokio::task::JoinHandle<Result<F::Output, tokio::task::JoinError>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let inner = tokio::spawn(future);
    tokio::spawn(async move {
        let result = inner.await;
        if let Err(e) = &result {
            record_task_panic(component, e);
        }
        result
    })
}

/// Whether a fault at `addr` with stack pointer `sp` looks like a stack overflow:
/// the faulting access is within 64 KiB below (or a page above) the stack pointer,
/// which is where a guard-page hit lands (a push, a call, or a stack probe of a new
/// frame). Null and heap faults are far from the stack pointer.
pub(crate) fn looks_like_stack_overflow(addr: u64, sp: u64) -> bool {
    addr != 0 && addr <= sp.saturating_add(4096) && addr >= sp.saturating_sub(64 * 1024)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) mod signals {
    use super::*;

    /// The crash-handler registration; dropping it detaches the handler.
    pub(crate) struct Attached(#[allow(dead_code)] crash_handler::CrashHandler);

    fn stack_pointer(ctx: &crash_handler::CrashContext) -> Option<u64> {
        #[cfg(target_arch = "x86_64")]
        {
            // REG_RSP
            Some(ctx.context.uc_mcontext.gregs[15] as u64)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = ctx;
            None
        }
    }

    /// The fault address (`si_addr`) of the signal. crash-handler copies the kernel's
    /// `siginfo_t` bytes unchanged into a `signalfd_siginfo`, whose `ssi_addr` sits
    /// elsewhere, so the address is read from `siginfo_t`'s own layout: on 64-bit
    /// Linux `si_addr` is the pointer at byte offset 16.
    fn fault_address(ctx: &crash_handler::CrashContext) -> u64 {
        #[cfg(target_pointer_width = "64")]
        {
            let base = std::ptr::addr_of!(ctx.siginfo).cast::<u8>();
            // SAFETY: signalfd_siginfo is 128 bytes; offset 16..24 is inside it.
            unsafe { std::ptr::read_unaligned(base.add(16).cast::<u64>()) }
        }
        #[cfg(not(target_pointer_width = "64"))]
        {
            let _ = ctx;
            0
        }
    }

    /// Attaches the fatal-signal handler (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT,
    /// SIGTRAP) through `crash-handler`, which runs it on an alternate stack and
    /// afterwards restores the previous dispositions and re-raises.
    pub(crate) fn attach() -> sanare_core::Result<Attached> {
        // SAFETY: the closure only calls async-signal-safe code: it formats into the
        // static buffer and writes with raw syscalls.
        let event = unsafe {
            crash_handler::make_crash_event(|ctx: &crash_handler::CrashContext| {
                let signo = ctx.siginfo.ssi_signo as i32;
                let addr = fault_address(ctx);
                let mut flags = 0;
                if (signo == libc::SIGSEGV || signo == libc::SIGBUS)
                    && stack_pointer(ctx).is_some_and(|sp| looks_like_stack_overflow(addr, sp))
                {
                    flags |= spool::FLAG_STACK_OVERFLOW;
                }
                note_incident();
                write_record_static(&RawRecord {
                    source: RecordSource::Signal,
                    flags,
                    signal: signo,
                    fault_address: addr,
                    unix_ms: now_unix_ms(),
                    pid: ctx.pid as u32,
                    tid: ctx.tid as u32,
                    alloc_size: 0,
                    message: b"",
                    location: b"",
                    thread: b"",
                    backtrace: b"",
                });
                // Not handled: the previous disposition (std's overflow reporter, or
                // the default action) runs next, so the process still dies as it would.
                crash_handler::CrashEventResult::Handled(false)
            })
        };
        crash_handler::CrashHandler::attach(event)
            .map(Attached)
            .map_err(|e| sanare_core::Error::other("attaching the fatal-signal handler", e))
    }
}

/// An opt-in wrapping global allocator that flags allocation failures.
///
/// When the inner allocator returns null, it sets a static flag and writes an
/// allocation-failure record to the crash spool (without allocating), before std's
/// allocation-error handler aborts the process. Install in the host's binary:
///
/// ```
/// use sanare_recovery::SanareAllocator;
///
/// #[global_allocator]
/// static GLOBAL: SanareAllocator = SanareAllocator::system();
/// # fn main() {}
/// ```
#[derive(Debug, Default)]
pub struct SanareAllocator<A = System> {
    inner: A,
}

impl SanareAllocator<System> {
    /// Wraps the system allocator.
    pub const fn system() -> Self {
        Self { inner: System }
    }
}

impl<A> SanareAllocator<A> {
    /// Wraps `inner`.
    pub const fn new(inner: A) -> Self {
        Self { inner }
    }

    #[cold]
    fn failed(&self, size: usize) {
        ALLOC_FAILED.store(true, Ordering::Relaxed);
        note_incident();
        write_record_static(&RawRecord {
            source: RecordSource::AllocFailure,
            flags: 0,
            signal: 0,
            fault_address: 0,
            unix_ms: now_unix_ms(),
            pid: std::process::id(),
            tid: gettid(),
            alloc_size: size as u64,
            message: b"memory allocation failed",
            location: b"",
            thread: b"",
            backtrace: b"",
        });
    }
}

// SAFETY: every method forwards to the inner allocator unchanged; failure handling
// only records and never allocates.
unsafe impl<A: GlobalAlloc> GlobalAlloc for SanareAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.inner.alloc(layout) };
        if p.is_null() {
            self.failed(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if p.is_null() {
            self.failed(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if p.is_null() {
            self.failed(new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_overflow_heuristic() {
        let sp = 0x7fff_0000_0000;
        assert!(looks_like_stack_overflow(sp - 8, sp));
        assert!(looks_like_stack_overflow(sp - 4096, sp));
        assert!(!looks_like_stack_overflow(0, sp));
        assert!(!looks_like_stack_overflow(0x5555_0000_0000, sp));
    }
}
