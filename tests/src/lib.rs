//! The harness every integration test uses (and `sortie-bench`), one module per thing it holds:
//!
//! - [`cluster`]: one throwaway PostgreSQL cluster per test binary (temporary directory, its
//!   own Unix socket, no TCP port) with a template database holding the real extension,
//!   stopped and removed by a watchdog process when the binary exits;
//! - [`database`]: a fresh database per test cloned from the template ([`TestDb`]), and calls
//!   of the SQL API that report the stable error code ([`call_on`], [`DbError`]);
//! - [`fixtures`]: small verbs over the SQL API, so tests read as the rules they prove;
//! - [`programs`]: the project's binaries, `sortie-runner` processes, `psql`, stand-in agents;
//! - [`mcp`]: a real MCP client talking to the real `sortie-mcp` over stdio;
//! - [`fake_http`]: a tiny HTTP server standing in for an agent runtime, an LLM or a webhook;
//! - [`in_process`]: the library's runner in the test process, ticked by the test;
//! - [`markdown`]: the documentation's code blocks, for tests that run its examples;
//! - [`citus`]: a Citus coordinator and two workers, for the scale-out tests.
//!
//! The items tests use most are re-exported here (`sortie_tests::TestDb`,
//! `sortie_tests::binary`, ...).

pub mod citus;
pub mod cluster;
pub mod database;
pub mod fake_http;
pub mod fixtures;
pub mod in_process;
pub mod markdown;
pub mod mcp;
pub mod programs;

pub use cluster::{
    connect_to, create_database, database_without_extension, start_cluster, TEST_SETTINGS,
};
pub use database::{call_on, on_citus, DbError, TestDb};
pub use programs::{binary, psql, run_binary, runner_process, script, terminate, wait_for};
