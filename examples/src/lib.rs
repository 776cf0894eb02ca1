//! Reference integrations of sanare, shared by the example binaries and the
//! end-to-end scenarios.
//!
//! [`orders`] is the journaled order service every example builds on: a write is
//! recorded in the journal (durable) before it is applied, and the replay handler
//! applies it idempotently, so a crash between the two loses nothing and a replay
//! doubles nothing.

pub mod orders;
pub mod web;

/// The Rust blocks of the documents a host reads first, compiled as doc tests of
/// this crate (`no_run`: they need a database). Getting started's program is also
/// `examples/host-axum`, built by `cargo xtask test` as a crate of its own.
#[cfg(doctest)]
mod docs {
    #[doc = include_str!("../../README.md")]
    struct Readme;

    #[doc = include_str!("../../docs/getting-started.md")]
    struct GettingStarted;

    #[doc = include_str!("../../crates/sanare/README.md")]
    struct FacadeReadme;
}
