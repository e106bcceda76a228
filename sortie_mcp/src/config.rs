//! Every environment variable (SPEC §9), parsed and validated once at start. A bad value is a
//! start-up error that names the variable.
//!
//! This is the only module that reads the process environment (a test below keeps it so): a
//! service's settings go into [`Config`], `--http`'s into `http::HttpSettings` (through
//! [`var`]), and the machine's and the terminal's (where files live, logs, colour, the stdio
//! request limit) into [`Env`]. Other modules take the values as arguments.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
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
    /// SPEC §13: how long a campaign created without steps waits for its coordinator's
    /// add_steps before the planner may plan it (SORTIE_PLAN_DELAY, seconds).
    pub plan_delay: Duration,
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
    /// SPEC §17: where verify and benchmark commands run (SORTIE_WORKDIR; unset: the
    /// process's own working directory).
    pub workdir: Option<std::path::PathBuf>,
    /// SPEC §17: how long a verify or benchmark command may run (SORTIE_VERIFY_TIMEOUT, s).
    pub verify_timeout: Duration,
    /// How long a planner or workflow LLM call may take (AI_REQUEST_TIMEOUT_MS).
    pub ai_request_timeout: Duration,
    /// A deterministic stand-in for the planner LLM (USE_STUB_AI_CLIENT=true), for trying
    /// campaigns and workflows without a model.
    pub stub_ai: bool,
    /// SPEC §18: the runner prunes campaigns that ended more than this many days ago, once a
    /// day (SORTIE_RETENTION_DAYS; 0 keeps everything).
    pub retention_days: u32,
    /// SPEC §15: what an agent connects with: a login holding only sortie_worker
    /// (SORTIE_WORKER_DATABASE_URL), or the address of a `sortie-mcp --http` (SORTIE_MCP_URL).
    pub worker_database_url: Option<String>,
    pub mcp_url: Option<String>,
    /// SPEC §15: names of the runner's variables an agent may see besides the allow-list
    /// (SORTIE_AGENT_ENV, comma- or space-separated).
    pub agent_env: Vec<String>,
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
    /// Whether a planner answers: an LLM at LITELLM_URL, or the stub (USE_STUB_AI_CLIENT).
    pub fn has_planner(&self) -> bool {
        self.litellm_url.is_some() || self.stub_ai
    }

    pub fn from_env() -> Result<Config> {
        Self::from_vars(&var)
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
        // SPEC §13: an agent runtime's address alone means dispatching to it.
        let dispatch = match var("SORTIE_DISPATCH").as_deref().map(str::trim) {
            None if var("OPENCLAW_RUNTIME_URL").is_some() => Dispatch::Http,
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
            worker_database_url: var("SORTIE_WORKER_DATABASE_URL"),
            mcp_url: url(var, "SORTIE_MCP_URL")?,
            agent_env: var("SORTIE_AGENT_ENV")
                .map(|names| {
                    names
                        .split(|c: char| c == ',' || c.is_whitespace())
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
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
            retention_days: parse(
                var,
                "SORTIE_RETENTION_DAYS",
                30,
                |v| *v <= 36_500,
                "days from 0 (keep everything) to 36500",
            )?,
            plan_delay: Duration::from_secs(parse(
                var,
                "SORTIE_PLAN_DELAY",
                10u64,
                |v| *v <= 86_400,
                "seconds from 0 to 86400",
            )?),
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
            workdir: var("SORTIE_WORKDIR").map(std::path::PathBuf::from),
            verify_timeout: Duration::from_secs(parse(
                var,
                "SORTIE_VERIFY_TIMEOUT",
                600u64,
                |v| (1..=86_400).contains(v),
                "seconds from 1 to 86400",
            )?),
            ai_request_timeout: Duration::from_millis(parse(
                var,
                "AI_REQUEST_TIMEOUT_MS",
                120_000u64,
                |v| (100..=3_600_000).contains(v),
                "milliseconds from 100 to 3600000",
            )?),
            stub_ai: match var("USE_STUB_AI_CLIENT").as_deref().map(str::trim) {
                None | Some("") | Some("false") | Some("0") => false,
                Some("true") | Some("1") => true,
                Some(other) => {
                    bail!("USE_STUB_AI_CLIENT={other:?} is invalid: expected true or false")
                }
            },
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

/// One variable of this process's environment; `None` when unset or not UTF-8. The source of
/// [`Config::from_env`] and `http::HttpSettings::from_env`, and of the runner's own variables
/// an agent is given (SPEC §15: the allow-list and SORTIE_AGENT_ENV, `agent::agent_env`).
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The variables that describe the machine and the terminal rather than a service: where
/// files live, how logs and colour look, the stdio request limit, the demo's agent. Read from
/// the process environment once, on first use ([`Env::get`]); tests build a [`Config`] from a
/// map, while these stay the process's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `SORTIE_DATA_DIR`, a directory, taken as given: the embedded cluster's home. Unset:
    /// `$XDG_DATA_HOME/sortie`, `$HOME/.local/share/sortie`, or `/var/lib/sortie` for root
    /// (`embedded::default_root`).
    pub data_dir: Option<PathBuf>,
    /// `XDG_DATA_HOME`, a directory (empty counts as unset): base of the default data and
    /// model directories. Unset: `$HOME/.local/share`.
    pub xdg_data_home: Option<PathBuf>,
    /// `HOME`, a directory: base of the default data and model directories when
    /// `XDG_DATA_HOME` is unset. No default.
    pub home: Option<PathBuf>,
    /// `SORTIE_PG_BIN`, a directory with `initdb` and `pg_ctl` (empty counts as unset). Unset:
    /// `pg_config --bindir`, then `/usr/lib/postgresql/15/bin` (`embedded::bin_dir`).
    pub pg_bin: Option<PathBuf>,
    /// `SORTIE_MODEL_DIR`, a directory with the offline embedder's `model.safetensors` and
    /// `tokenizer.json`, tried first. Unset: the data directories' `sortie/models/…`
    /// (`embed::minilm::find_model_dir`).
    pub model_dir: Option<PathBuf>,
    /// `SORTIE_DEMO_AGENT`, a file: the agent script `sortie-runner demo` runs. Unset:
    /// `examples/demo-agent.sh` of the source tree.
    pub demo_agent: Option<PathBuf>,
    /// `NO_COLOR` set to anything but the empty string: `sortie` never colours. Default
    /// (unset or empty): colour on a terminal.
    pub no_color: bool,
    /// `RUST_LOG`, a full tracing filter, as given. Unset (or not UTF-8 or not a valid
    /// filter): `LOG_LEVEL` decides.
    pub rust_log: Option<String>,
    /// `LOG_LEVEL`: Sortie's own log level when `RUST_LOG` is unset (error, warn, info,
    /// debug, trace; anything else: info, `crate::log_filter`).
    pub log_level: Option<String>,
    /// `SORTIE_MAX_REQUEST_BYTES`, in bytes: the longest JSON-RPC request line `sortie-mcp`
    /// takes on stdio. Default 16777216 (`transport::DEFAULT_MAX_LINE_BYTES`), also when the
    /// value is not a positive whole number.
    pub max_request_bytes: usize,
}

impl Env {
    /// The process's own, read once.
    pub fn get() -> &'static Env {
        static ENV: OnceLock<Env> = OnceLock::new();
        ENV.get_or_init(|| Env::from_vars(&|name| std::env::var_os(name)))
    }

    /// From any source of variables (a map in tests).
    pub fn from_vars(var_os: &dyn Fn(&str) -> Option<OsString>) -> Env {
        let var = |name: &str| var_os(name).and_then(|v| v.into_string().ok());
        let non_empty = |v: &OsString| !v.is_empty();
        Env {
            data_dir: var_os("SORTIE_DATA_DIR").map(PathBuf::from),
            xdg_data_home: var_os("XDG_DATA_HOME").filter(non_empty).map(PathBuf::from),
            home: var_os("HOME").map(PathBuf::from),
            pg_bin: var_os("SORTIE_PG_BIN").filter(non_empty).map(PathBuf::from),
            model_dir: var_os("SORTIE_MODEL_DIR").map(PathBuf::from),
            demo_agent: var_os("SORTIE_DEMO_AGENT").map(PathBuf::from),
            no_color: var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
            rust_log: var("RUST_LOG"),
            log_level: var("LOG_LEVEL"),
            max_request_bytes: var("SORTIE_MAX_REQUEST_BYTES")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(crate::transport::DEFAULT_MAX_LINE_BYTES),
        }
    }
}

/// Which program reads a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Both,
    Mcp,
    Runner,
    /// The `sortie` command-line tool.
    Cli,
}

/// One environment variable: the single table `--help` of both binaries is generated from,
/// so the help cannot drift from what the programs read (a test checks every variable the
/// code reads is here).
pub struct EnvVar {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
    pub read_by: Reader,
}

const fn env(
    name: &'static str,
    default: &'static str,
    meaning: &'static str,
    read_by: Reader,
) -> EnvVar {
    EnvVar {
        name,
        default,
        meaning,
        read_by,
    }
}

pub const ENV_VARS: &[EnvVar] = &[
    env("DATABASE_URL", "embedded cluster", "PostgreSQL connection string (postgresql://user:pass@host:5432/db or key=value); unset: a private cluster under SORTIE_DATA_DIR", Reader::Both),
    env("SORTIE_SCHEMA", "sortie", "schema the sortie extension is installed in", Reader::Both),
    env("SORTIE_ROLE", "both", "coordinator, worker or both: which MCP tools are listed", Reader::Both),
    env("SORTIE_STEP_ID", "-", "a worker session's step (set by the runner)", Reader::Both),
    env("SORTIE_CAMPAIGN_ID", "-", "a worker session's campaign (set by the runner)", Reader::Both),
    env("SORTIE_CLAIM_TOKEN", "-", "a worker session's claim token (set by the runner)", Reader::Both),
    env("SORTIE_OWNER", "host/pid", "claim owner name", Reader::Both),
    env("SORTIE_MAX_CONCURRENT", "4", "dispatched steps running at once, one cap shared by every runner of the database (pull-mode claims do not count)", Reader::Both),
    env("SORTIE_PLAN_DELAY", "10", "seconds a campaign created without steps waits for add_steps before the planner may plan it", Reader::Both),
    env("SORTIE_RETENTION_DAYS", "30", "days after its end a campaign is removed with its steps, events and notes, by the runner once a day (0: never)", Reader::Runner),
    env("SORTIE_ZOMBIE_TIMEOUT", "30", "minutes: lease the runner gives each dispatch", Reader::Both),
    env("SORTIE_PREVIEW_HEAD", "600", "characters of an upstream output shown from its start", Reader::Both),
    env("SORTIE_PREVIEW_TAIL", "200", "characters of an upstream output shown from its end", Reader::Both),
    env("LITELLM_URL", "-", "OpenAI-compatible endpoint for the planner and embeddings", Reader::Both),
    env("LITELLM_KEY", "-", "API key for LITELLM_URL", Reader::Both),
    env("SORTIE_PLANNER_MODEL", "qwen3.5:9b", "planner model at LITELLM_URL", Reader::Both),
    env("SORTIE_EMBEDDING_MODEL", "-", "embedding model at LITELLM_URL (unset: offline all-MiniLM-L6-v2)", Reader::Both),
    env("SORTIE_EMBEDDING_DIM", "384", "embedding dimension", Reader::Both),
    env("OPENCLAW_RUNTIME_URL", "-", "agent runtime for SORTIE_DISPATCH=http", Reader::Both),
    env("SORTIE_DISPATCH", "none (http when OPENCLAW_RUNTIME_URL is set)", "http, command or none (workers pull with claim_next)", Reader::Both),
    env("SORTIE_AGENT_COMMAND", "-", "agent command line for SORTIE_DISPATCH=command (prompt on stdin)", Reader::Both),
    env("SORTIE_WEBHOOK_URL", "-", "Discord-compatible webhook for notifications", Reader::Both),
    env("SORTIE_WORKDIR", "current directory", "where verify and benchmark commands run (sh -c)", Reader::Both),
    env("SORTIE_VERIFY_TIMEOUT", "600", "seconds a verify or benchmark command may run", Reader::Both),
    env("AI_REQUEST_TIMEOUT_MS", "120000", "milliseconds a planner or workflow LLM call may take", Reader::Both),
    env("USE_STUB_AI_CLIENT", "false", "true: a deterministic stub stands in for the planner LLM (no model needed)", Reader::Both),
    env("LOG_LEVEL", "info", "Sortie's own log level when RUST_LOG is unset (error, warn, info, debug, trace)", Reader::Both),
    env("WORKFLOW_DEFINITIONS_DIR", "-", "folder of Markdown workflows, one sub-folder each", Reader::Both),
    env("SORTIE_MAX_REQUEST_BYTES", "16777216", "longest JSON-RPC request line sortie-mcp accepts, in bytes", Reader::Mcp),
    env("SORTIE_HTTP_TOKEN", "-", "bearer token of role both for --http (16 characters or more)", Reader::Mcp),
    env("SORTIE_HTTP_TOKENS_FILE", "-", "more --http bearer tokens, one per line: `role token` or `role sha256:<hex>` (role: coordinator, worker or both)", Reader::Mcp),
    env("SORTIE_HTTP_SESSION_IDLE", "1800", "seconds an idle --http session is kept", Reader::Mcp),
    env("SORTIE_HTTP_MAX_SESSIONS", "1000", "--http sessions kept at most (the oldest idle one is closed first)", Reader::Mcp),
    env("SORTIE_HTTP_ALLOWED_ORIGINS", "-", "comma-separated Origins --http accepts besides loopback ones of its own port (others: 403)", Reader::Mcp),
    env("SORTIE_HTTP_ALLOWED_HOSTS", "-", "comma-separated Host names --http accepts besides localhost and 127.0.0.1 (DNS rebinding)", Reader::Mcp),
    env("SORTIE_WORKER_DATABASE_URL", "embedded: login sortie_agent", "what agents connect with: a login holding only sortie_worker (never DATABASE_URL)", Reader::Runner),
    env("SORTIE_MCP_URL", "-", "a sortie-mcp --http address agents reach Sortie by instead of a database login (claim token as bearer)", Reader::Runner),
    env("SORTIE_AGENT_ENV", "-", "names of the runner's variables an agent also gets, besides PATH HOME LANG TMPDIR TERM", Reader::Runner),
    env("SORTIE_DATA_DIR", "~/.local/share/sortie", "where the embedded cluster lives (/var/lib/sortie for root)", Reader::Both),
    env("SORTIE_PG_BIN", "pg_config --bindir", "PostgreSQL server binaries (initdb, pg_ctl) for the embedded cluster", Reader::Both),
    env("SORTIE_MODEL_DIR", "~/.local/share/sortie/models/all-MiniLM-L6-v2", "the offline embedder's model files", Reader::Both),
    env("SORTIE_DEMO_AGENT", "examples/demo-agent.sh", "agent script `sortie-runner demo` runs", Reader::Runner),
    env("XDG_DATA_HOME", "~/.local/share", "base of the default SORTIE_DATA_DIR and SORTIE_MODEL_DIR", Reader::Both),
    env("RUST_LOG", "warn,sortie_mcp=info", "log filter; logs go to stderr", Reader::Both),
    env("NO_COLOR", "-", "any value turns colour off (colour is only used on a terminal)", Reader::Cli),
];

/// The `--help` epilogue of one binary: its variables with defaults, then examples.
pub fn env_help(reader: Reader, examples: &[&str]) -> String {
    let vars: Vec<&EnvVar> = ENV_VARS
        .iter()
        .filter(|v| v.read_by == Reader::Both || v.read_by == reader)
        .collect();
    let width = vars.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut text = String::from("Environment variables (default in brackets):\n");
    for v in vars {
        text.push_str(&format!(
            "  {:width$}  {} [{}]\n",
            v.name, v.meaning, v.default
        ));
    }
    text.push_str("\nExamples:\n");
    for example in examples {
        text.push_str(&format!("  {example}\n"));
    }
    text
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
    fn every_variable_the_config_reads_is_in_the_help_table() {
        let asked = std::cell::RefCell::new(Vec::new());
        let _ = Config::from_vars(&|name| {
            asked.borrow_mut().push(name.to_string());
            None
        });
        let asked = asked.into_inner();
        assert!(asked.contains(&"DATABASE_URL".to_string()), "{asked:?}");
        for name in asked {
            assert!(
                ENV_VARS.iter().any(|v| v.name == name),
                "{name} is read but missing from ENV_VARS (the --help table)"
            );
        }
    }

    #[test]
    fn every_variable_env_reads_is_in_the_help_table() {
        let asked = std::cell::RefCell::new(Vec::new());
        let _ = Env::from_vars(&|name| {
            asked.borrow_mut().push(name.to_string());
            None
        });
        let asked = asked.into_inner();
        assert!(asked.contains(&"SORTIE_PG_BIN".to_string()), "{asked:?}");
        for name in asked.iter().filter(|n| *n != "HOME") {
            assert!(
                ENV_VARS.iter().any(|v| v.name == name),
                "{name} is read but missing from ENV_VARS (the --help table)"
            );
        }
    }

    fn env_of(vars: &[(&str, &str)]) -> Env {
        Env::from_vars(&|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn env_defaults_and_empty_values() {
        let none = env_of(&[]);
        assert_eq!(
            none.max_request_bytes,
            crate::transport::DEFAULT_MAX_LINE_BYTES
        );
        assert!(!none.no_color && none.data_dir.is_none() && none.pg_bin.is_none());
        // NO_COLOR, XDG_DATA_HOME and SORTIE_PG_BIN count only when not empty.
        let empty = env_of(&[
            ("NO_COLOR", ""),
            ("XDG_DATA_HOME", ""),
            ("SORTIE_PG_BIN", ""),
        ]);
        assert!(!empty.no_color && empty.xdg_data_home.is_none() && empty.pg_bin.is_none());
        assert!(env_of(&[("NO_COLOR", "1")]).no_color);
        for bad in ["0", "-5", "lots"] {
            let e = env_of(&[("SORTIE_MAX_REQUEST_BYTES", bad)]);
            assert_eq!(
                e.max_request_bytes,
                crate::transport::DEFAULT_MAX_LINE_BYTES,
                "{bad}"
            );
        }
        assert_eq!(
            env_of(&[("SORTIE_MAX_REQUEST_BYTES", " 1000 ")]).max_request_bytes,
            1000
        );
        let dirs = env_of(&[
            ("SORTIE_DATA_DIR", "/d"),
            ("SORTIE_MODEL_DIR", "/m"),
            ("HOME", "/h"),
        ]);
        assert_eq!(dirs.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(dirs.model_dir, Some(PathBuf::from("/m")));
        assert_eq!(dirs.home, Some(PathBuf::from("/h")));
    }

    /// The environment is read here and nowhere else in sortie_mcp (binaries included): any
    /// other module takes the values as arguments.
    #[test]
    fn no_other_source_file_reads_the_environment() {
        fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && path.file_name().is_some_and(|n| n != "config.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        // std::env::var, var_os, vars, vars_os; tracing's own readers.
                        let reads = ["env::var", "var_os(", "try_from_env", "from_default_env"];
                        if reads.iter().any(|r| line.contains(r)) {
                            found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        walk(&src, &mut found);
        assert!(
            src.join("config.rs").is_file(),
            "the walk looks at {}",
            src.display()
        );
        assert!(
            found.is_empty(),
            "the environment is read outside config.rs; read it there and pass the value:\n{}",
            found.join("\n")
        );
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
