//! End-to-end tests of the repair engine against a real PostgreSQL, one binary.

mod bounded;
mod common;
mod flow;
mod harm;
mod migrate;
mod revalidate;
mod tamper;
