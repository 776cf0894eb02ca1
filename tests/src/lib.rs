//! End-to-end scenarios of sanare live in this crate's `tests/` folder; each runs the
//! real components against a real PostgreSQL (see `sanare-testing`).
