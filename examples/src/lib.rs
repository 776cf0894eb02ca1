//! Reference integrations of sanare, shared by the example binaries and the
//! end-to-end scenarios.
//!
//! [`orders`] is the journaled order service every example builds on: a write is
//! recorded in the journal (durable) before it is applied, and the replay handler
//! applies it idempotently, so a crash between the two loses nothing and a replay
//! doubles nothing.

pub mod orders;
pub mod web;
