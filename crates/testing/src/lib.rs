//! Test harness for sanare: a real PostgreSQL for every test.
//!
//! ```no_run
//! # async fn demo() {
//! let db = sanare_testing::test_db().await;
//! let client = db.client().await;
//! client.batch_execute("CREATE TABLE t (id int)").await.unwrap();
//! // `db` is dropped at the end of the test, and its database with it.
//! # }
//! ```
//!
//! - [`test_db`] creates a fresh database per test on the server named by
//!   `DATABASE_URL`, or, when that is unset, on one throwaway cluster per test process
//!   (see [`cluster`]). `cargo xtask test` starts one cluster for the whole run and
//!   hands its `DATABASE_URL` to every test process.
//! - [`fixtures::order_service`] installs a realistic order-service schema and
//!   generates N rows of deterministic data; [`zoo`] installs a schema zoo (partitions,
//!   inheritance, unusual types, NOT VALID and deferrable constraints, an invalid index,
//!   a never-analysed table) and lists session settings that differ from the defaults.
//!
//! The `cluster` module is synchronous and always built; everything else is behind
//! the default `db` feature.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cluster;
#[cfg(feature = "db")]
mod db;
#[cfg(feature = "db")]
pub mod fixtures;
#[cfg(feature = "db")]
pub mod zoo;

#[cfg(feature = "db")]
pub use db::{TestDb, admin_url, statements_counted, test_db, test_db_on, with_dbname};
