//! Sortie's pure rules: everything the engine decides without looking at the database.
//!
//! The extension (`sortie_pg`) wraps these functions as SQL functions; keeping them free of
//! PostgreSQL lets them be unit-tested in milliseconds.

pub mod error;
pub mod fingerprint;
pub mod metric;
pub mod plan;
pub mod preview;
pub mod steps;

pub use error::{RuleError, RuleResult};
