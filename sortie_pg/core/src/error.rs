use thiserror::Error;

/// A rule violation found before anything touches the database. `code` is the stable error
/// code the whole product uses (SQLSTATE mapping lives in the extension's `_raise()`).
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

/// The one error vocabulary (SPEC §5): every stable code a rule raises, with its SQLSTATE of
/// class SR. The extension's `_raise()` (sql/bootstrap.sql) turns a code into its SQLSTATE and
/// must list exactly these pairs (a test below reads it); the MCP server and the tests turn a
/// SQLSTATE back into its code from this table, never from message text.
pub const ERROR_CODES: &[(&str, &str)] = &[
    ("not_found", "SR001"),
    ("invalid_state", "SR002"),
    ("stale_claim", "SR003"),
    ("depth_limit", "SR004"),
    ("invalid_argument", "SR005"),
    ("budget_exhausted", "SR006"),
    ("cycle", "SR007"),
    ("skipped", "SR008"),
    ("forbidden", "SR009"),
    ("choice_required", "SR010"),
];

/// The code of one of the extension's SQLSTATEs.
pub fn code_for_sqlstate(sqlstate: &str) -> Option<&'static str> {
    ERROR_CODES
        .iter()
        .find(|(_, state)| *state == sqlstate)
        .map(|(code, _)| *code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_raise()`'s CASE, read from the SQL that installs it, is the table above.
    #[test]
    fn raise_maps_exactly_the_error_codes() {
        let sql = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../sql/bootstrap.sql"
        ))
        .expect("sql/bootstrap.sql");
        let start = sql
            .find("CREATE FUNCTION _raise(")
            .expect("_raise() in bootstrap.sql");
        let body = &sql[start..start + sql[start..].find("$$;").expect("end of _raise()")];
        let pairs: Vec<(String, String)> = body
            .lines()
            .filter_map(|line| {
                let line = line.trim().strip_prefix("WHEN '")?;
                let (code, rest) = line.split_once('\'')?;
                let state = rest.split('\'').nth(1)?;
                Some((code.to_string(), state.to_string()))
            })
            .collect();
        let expected: Vec<(String, String)> = ERROR_CODES
            .iter()
            .map(|(c, s)| (c.to_string(), s.to_string()))
            .collect();
        assert_eq!(pairs, expected);
        assert_eq!(code_for_sqlstate("SR007"), Some("cycle"));
        assert_eq!(code_for_sqlstate("SR000"), None);
    }
}
