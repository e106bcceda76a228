//! Every environment variable (SPEC §9), parsed and validated once at start. A bad value is a
//! start-up error that names the variable.

use std::time::Duration;

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Worker,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    Http,
    Command,
    None,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// None: the embedded default cluster.
    pub database_url: Option<String>,
    pub schema: String,
    pub role: Role,
    pub step_id: Option<i64>,
    pub campaign_id: Option<uuid::Uuid>,
    pub claim_token: Option<uuid::Uuid>,
    pub owner: String,
    pub max_concurrent: u32,
    pub zombie_timeout: Duration,
    pub preview_head: i32,
    pub preview_tail: i32,
    pub litellm_url: Option<String>,
    pub litellm_key: Option<String>,
    pub planner_model: String,
    pub embedding_model: Option<String>,
    pub embedding_dim: u32,
    pub runtime_url: Option<String>,
    pub dispatch: Dispatch,
    pub agent_command: Option<String>,
    pub webhook_url: Option<String>,
    /// Folder of Markdown workflows (SPEC §7), one sub-folder per workflow.
    pub workflows_dir: Option<std::path::PathBuf>,
}

/// Where variables come from: the process environment, or a map in tests.
type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

fn parse<T: std::str::FromStr>(
    var: Vars,
    name: &str,
    default: T,
    check: impl Fn(&T) -> bool,
    expected: &str,
) -> Result<T> {
    match var(name) {
        None => Ok(default),
        Some(raw) => match raw.trim().parse::<T>() {
            Ok(v) if check(&v) => Ok(v),
            _ => bail!("{name}={raw:?} is invalid: expected {expected}"),
        },
    }
}

fn url(var: Vars, name: &str) -> Result<Option<String>> {
    match var(name) {
        None => Ok(None),
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
            Ok(Some(u.trim_end_matches('/').to_string()))
        }
        Some(u) => bail!("{name}={u:?} is invalid: expected an http:// or https:// URL"),
    }
}

/// A schema name we put into SQL text: a plain identifier only.
pub fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Config {
    pub fn from_env() -> Result<Config> {
        Self::from_vars(&|name| std::env::var(name).ok())
    }

    /// The configuration from any source of variables; unset and empty are the same.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let var: Vars = &var;
        let schema = var("SORTIE_SCHEMA").unwrap_or_else(|| "sortie".into());
        if !valid_identifier(&schema) {
            bail!("SORTIE_SCHEMA={schema:?} is invalid: expected a lower-case SQL identifier such as sortie");
        }
        let role = match var("SORTIE_ROLE").as_deref().map(str::trim) {
            None | Some("both") => Role::Both,
            Some("coordinator") => Role::Coordinator,
            Some("worker") => Role::Worker,
            Some(other) => {
                bail!("SORTIE_ROLE={other:?} is invalid: expected coordinator, worker or both")
            }
        };
        let dispatch = match var("SORTIE_DISPATCH").as_deref().map(str::trim) {
            None | Some("none") => Dispatch::None,
            Some("http") => Dispatch::Http,
            Some("command") => Dispatch::Command,
            Some(other) => {
                bail!("SORTIE_DISPATCH={other:?} is invalid: expected http, command or none")
            }
        };
        let step_id = match var("SORTIE_STEP_ID") {
            None => None,
            Some(raw) => Some(
                raw.trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "SORTIE_STEP_ID={raw:?} is invalid: expected a positive step id"
                        )
                    })?,
            ),
        };
        let uuid_var = |name: &str| -> Result<Option<uuid::Uuid>> {
            match var(name) {
                None => Ok(None),
                Some(raw) => uuid::Uuid::parse_str(raw.trim())
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("{name}={raw:?} is invalid: expected a UUID")),
            }
        };
        let config = Config {
            database_url: var("DATABASE_URL"),
            schema,
            role,
            step_id,
            campaign_id: uuid_var("SORTIE_CAMPAIGN_ID")?,
            claim_token: uuid_var("SORTIE_CLAIM_TOKEN")?,
            owner: var("SORTIE_OWNER").unwrap_or_else(default_owner),
            max_concurrent: parse(
                var,
                "SORTIE_MAX_CONCURRENT",
                4,
                |v| (1..=10_000).contains(v),
                "a whole number from 1 to 10000",
            )?,
            zombie_timeout: Duration::from_secs(
                60 * parse(
                    var,
                    "SORTIE_ZOMBIE_TIMEOUT",
                    30u64,
                    |v| (1..=10_080).contains(v),
                    "minutes from 1 to 10080",
                )?,
            ),
            preview_head: parse(
                var,
                "SORTIE_PREVIEW_HEAD",
                600,
                |v| (0..=100_000).contains(v),
                "characters from 0 to 100000",
            )?,
            preview_tail: parse(
                var,
                "SORTIE_PREVIEW_TAIL",
                200,
                |v| (0..=100_000).contains(v),
                "characters from 0 to 100000",
            )?,
            litellm_url: url(var, "LITELLM_URL")?,
            litellm_key: var("LITELLM_KEY"),
            planner_model: var("SORTIE_PLANNER_MODEL").unwrap_or_else(|| "qwen3.5:9b".into()),
            embedding_model: var("SORTIE_EMBEDDING_MODEL"),
            embedding_dim: parse(
                var,
                "SORTIE_EMBEDDING_DIM",
                384,
                |v| (1..=16_000).contains(v),
                "a dimension from 1 to 16000",
            )?,
            runtime_url: url(var, "OPENCLAW_RUNTIME_URL")?,
            dispatch,
            agent_command: var("SORTIE_AGENT_COMMAND"),
            webhook_url: url(var, "SORTIE_WEBHOOK_URL")?,
            workflows_dir: var("WORKFLOW_DEFINITIONS_DIR").map(std::path::PathBuf::from),
        };
        if config.dispatch == Dispatch::Http && config.runtime_url.is_none() {
            bail!("SORTIE_DISPATCH=http needs OPENCLAW_RUNTIME_URL");
        }
        if config.dispatch == Dispatch::Command && config.agent_command.is_none() {
            bail!("SORTIE_DISPATCH=command needs SORTIE_AGENT_COMMAND");
        }
        Ok(config)
    }
}

fn default_owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}/{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(&|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = config(&[]).unwrap();
        assert_eq!(
            (c.schema.as_str(), c.role, c.max_concurrent, c.dispatch),
            ("sortie", Role::Both, 4, Dispatch::None)
        );
        assert_eq!(c.zombie_timeout, Duration::from_secs(30 * 60));
        assert!(c.database_url.is_none());
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_variable() {
        for (name, value) in [
            ("SORTIE_ROLE", "boss"),
            ("SORTIE_MAX_CONCURRENT", "0"),
            ("SORTIE_SCHEMA", "x; drop"),
            ("SORTIE_STEP_ID", "-3"),
            ("SORTIE_CLAIM_TOKEN", "nope"),
            ("LITELLM_URL", "ftp://x"),
            ("SORTIE_DISPATCH", "carrier-pigeon"),
            ("SORTIE_ZOMBIE_TIMEOUT", "forever"),
        ] {
            let err = config(&[(name, value)]).unwrap_err().to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
        let err = config(&[("SORTIE_DISPATCH", "http")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("OPENCLAW_RUNTIME_URL"), "{err}");
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_identifier("sortie"));
        assert!(valid_identifier("_s2"));
        assert!(!valid_identifier("Sortie"));
        assert!(!valid_identifier("a;drop table x"));
        assert!(!valid_identifier("2x"));
        assert!(!valid_identifier(""));
    }
}
