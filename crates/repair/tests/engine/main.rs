//! End-to-end tests of the repair engine against a real PostgreSQL, one binary.

mod common;
mod flow;
mod harm;
mod revalidate;
mod tamper;
