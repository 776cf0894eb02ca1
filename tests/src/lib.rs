//! End-to-end scenarios of sanare live in this crate's `tests/` folder; each runs the
//! real components against a real PostgreSQL (see `sanare-testing`). Scenarios that
//! crash a service re-execute their own test binary as the service (see
//! `tests/crashes.rs`), so the crash is a real process dying, not a simulation in
//! the test's own process.
