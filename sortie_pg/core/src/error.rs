use thiserror::Error;

/// A rule violation found before anything touches the database. `code` is the stable error
/// code the whole product uses (SQLSTATE mapping lives in the extension's `raise()`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct RuleError {
    pub code: &'static str,
    pub message: String,
}

impl RuleError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: "invalid_argument",
            message: message.into(),
        }
    }

    pub fn cycle(message: impl Into<String>) -> Self {
        Self {
            code: "cycle",
            message: message.into(),
        }
    }
}

pub type RuleResult<T> = Result<T, RuleError>;
