//! What an agent is given (SPEC §15): a step-scoped credential, never the runner's database.
//!
//! An agent's environment is an allow-list of the runner's own variables (`PATH`, `HOME`,
//! `LANG`, `TMPDIR`, `TERM` and the names in `SORTIE_AGENT_ENV`), the session (`SORTIE_STEP_ID`,
//! `SORTIE_CAMPAIGN_ID`, `SORTIE_CLAIM_TOKEN`, …) and how to reach Sortie as that worker: a
//! login holding only `sortie_worker` (`SORTIE_WORKER_DATABASE_URL`, or the `sortie_agent` login
//! the runner makes on the database it uses) or the address of a `sortie-mcp --http`
//! (`SORTIE_MCP_URL`, the claim token being the bearer). `SORTIE_MCP_CONFIG` names a per-step
//! file in the `mcpServers` format with all of that filled in, for agent CLIs that start MCP
//! servers with an environment of their own.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tracing::warn;

use crate::config::Config;
use crate::db::Db;

/// The runner's variables every agent gets when set.
pub const ALLOWED_ENV: [&str; 5] = ["PATH", "HOME", "LANG", "TMPDIR", "TERM"];

/// The login the runner makes for its agents when SORTIE_WORKER_DATABASE_URL is not set.
pub const AGENT_LOGIN: &str = "sortie_agent";

/// The session of one claimed step.
pub struct Session {
    pub step_id: i64,
    pub campaign_id: uuid::Uuid,
    pub claim_token: uuid::Uuid,
}

/// How agents reach Sortie, decided once per runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// A database login holding only sortie_worker.
    Database(String),
    /// A `sortie-mcp --http` address; the claim token is the bearer.
    Mcp(String),
}

impl Connection {
    /// SORTIE_MCP_URL first, then SORTIE_WORKER_DATABASE_URL, else the runner's own database
    /// with the `sortie_agent` login in place of its user and without its password.
    pub fn for_agents(config: &Config, runner_database_url: &str) -> Connection {
        if let Some(url) = &config.mcp_url {
            return Connection::Mcp(url.clone());
        }
        if let Some(url) = &config.worker_database_url {
            return Connection::Database(url.clone());
        }
        Connection::Database(with_login(runner_database_url, AGENT_LOGIN))
    }
}

/// `connection_string` with `user` as its user and no password, in either of libpq's forms
/// (URL or key=value).
pub fn with_login(connection_string: &str, user: &str) -> String {
    let s = connection_string.trim();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        if let Ok(mut url) = reqwest::Url::parse(s) {
            let _ = url.set_username(user);
            let _ = url.set_password(None);
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != "user" && k != "password")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if pairs.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            return url.to_string();
        }
    }
    let mut words: Vec<String> = s
        .split_whitespace()
        .filter(|w| !w.starts_with("user=") && !w.starts_with("password="))
        .map(str::to_string)
        .collect();
    words.push(format!("user={user}"));
    words.join(" ")
}

/// Makes the `sortie_agent` login (member of sortie_worker only) when the runner's own login
/// may: the default for agents when SORTIE_WORKER_DATABASE_URL is not set. It has no password:
/// it serves where the server trusts local connections (the embedded cluster's private socket);
/// elsewhere set SORTIE_WORKER_DATABASE_URL. Failing here is a warning, not an error.
pub async fn ensure_agent_login(db: &Db) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let sql = format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{AGENT_LOGIN}') THEN
                     CREATE ROLE {AGENT_LOGIN} LOGIN;
                 END IF;
                 IF NOT pg_has_role('{AGENT_LOGIN}', 'sortie_worker', 'MEMBER') THEN
                     GRANT sortie_worker TO {AGENT_LOGIN};
                 END IF;
             END $$"
        );
        let result = match db.client().await {
            Ok(client) => client.batch_execute(&sql).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            warn!(error = %e, "cannot make the {AGENT_LOGIN} login for agents; set SORTIE_WORKER_DATABASE_URL to a login holding only sortie_worker");
        }
    })
    .await;
}

/// The session variables, and how to reach Sortie, as name/value pairs.
pub fn session_vars(
    session: &Session,
    config: &Config,
    connection: &Connection,
) -> Vec<(String, String)> {
    let mut vars = vec![
        ("SORTIE_ROLE".to_string(), "worker".to_string()),
        ("SORTIE_STEP_ID".into(), session.step_id.to_string()),
        ("SORTIE_CAMPAIGN_ID".into(), session.campaign_id.to_string()),
        ("SORTIE_CLAIM_TOKEN".into(), session.claim_token.to_string()),
        ("SORTIE_SCHEMA".into(), config.schema.clone()),
    ];
    match connection {
        Connection::Database(url) => vars.push(("DATABASE_URL".into(), url.clone())),
        Connection::Mcp(url) => vars.push(("SORTIE_MCP_URL".into(), url.clone())),
    }
    vars
}

/// An agent's whole environment: the allow-list taken from `runner_env`, then the session.
pub fn agent_env(
    session: &Session,
    config: &Config,
    connection: &Connection,
    runner_env: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let allowed = ALLOWED_ENV
        .iter()
        .map(|n| n.to_string())
        .chain(config.agent_env.iter().cloned());
    for name in allowed {
        if name == "DATABASE_URL" || name == "LITELLM_KEY" {
            // Never the runner's credentials, whatever SORTIE_AGENT_ENV says.
            continue;
        }
        if let Some(value) = runner_env(&name) {
            if !env.iter().any(|(k, _)| *k == name) {
                env.push((name, value));
            }
        }
    }
    env.retain(|(k, _)| !k.starts_with("SORTIE_"));
    env.extend(session_vars(session, config, connection));
    if let Some(dir) = bin_dir() {
        env.push(("SORTIE_BIN_DIR".into(), dir.display().to_string()));
    }
    if let Some(dir) = &config.workdir {
        env.push(("SORTIE_WORKDIR".into(), dir.display().to_string()));
    }
    env
}

/// Where the running binary's siblings (sortie-mcp) are.
pub fn bin_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The `mcpServers` entry for this step: the sortie-mcp beside this binary started with the
/// session and connection (a client that passes it no other environment still reaches the
/// right step), or the HTTP address with the claim token as bearer.
pub fn mcp_config(session: &Session, config: &Config, connection: &Connection) -> Value {
    let entry = match connection {
        Connection::Mcp(url) => json!({
            "type": "http",
            "url": url,
            "headers": {"Authorization": format!("Bearer {}", session.claim_token)},
        }),
        Connection::Database(_) => {
            let command = bin_dir()
                .map(|d| d.join("sortie-mcp"))
                .unwrap_or_else(|| PathBuf::from("sortie-mcp"));
            let env: serde_json::Map<String, Value> = session_vars(session, config, connection)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            json!({"command": command.display().to_string(), "args": [], "env": env})
        }
    };
    json!({"mcpServers": {"sortie": entry}})
}

/// A per-step directory (0700) holding `mcp.json` (0600); removed when dropped.
pub struct McpConfigFile {
    dir: PathBuf,
    pub path: PathBuf,
}

impl McpConfigFile {
    pub fn write(step_id: i64, config: &Value) -> std::io::Result<McpConfigFile> {
        let dir = std::env::temp_dir().join(format!(
            "sortie-step-{step_id}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let path = dir.join("mcp.json");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(serde_json::to_string_pretty(config)?.as_bytes())?;
        Ok(McpConfigFile { dir, path })
    }
}

impl Drop for McpConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_login_replaces_user_and_password_in_both_forms() {
        assert_eq!(
            with_login(
                "postgresql://runner:secret@db.example:5432/app?sslmode=require&password=x",
                "sortie_agent"
            ),
            "postgresql://sortie_agent@db.example:5432/app?sslmode=require"
        );
        assert_eq!(
            with_login(
                "host=/run/pg user=postgres password=secret dbname=sortie",
                "sortie_agent"
            ),
            "host=/run/pg dbname=sortie user=sortie_agent"
        );
    }

    fn config(vars: &[(&str, &str)]) -> Config {
        Config::from_vars(&|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
        .expect("config")
    }

    #[test]
    fn an_agent_gets_the_allow_list_and_its_session_but_no_credentials_of_the_runner() {
        let config = config(&[(
            "SORTIE_AGENT_ENV",
            "ANTHROPIC_API_KEY, LITELLM_KEY DATABASE_URL",
        )]);
        let runner_env = |name: &str| -> Option<String> {
            match name {
                "PATH" => Some("/usr/bin".into()),
                "HOME" => Some("/home/r".into()),
                "ANTHROPIC_API_KEY" => Some("agent-key".into()),
                "LITELLM_KEY" => Some("runner-key".into()),
                "DATABASE_URL" => Some("postgresql://runner:secret@h/db".into()),
                "AWS_SECRET_ACCESS_KEY" => Some("nope".into()),
                _ => None,
            }
        };
        let session = Session {
            step_id: 7,
            campaign_id: uuid::Uuid::nil(),
            claim_token: uuid::Uuid::nil(),
        };
        let connection = Connection::for_agents(&config, "postgresql://runner:secret@h/db");
        let env = agent_env(&session, &config, &connection, &runner_env);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/usr/bin"));
        assert_eq!(get("ANTHROPIC_API_KEY"), Some("agent-key"));
        assert_eq!(get("LITELLM_KEY"), None);
        assert_eq!(get("AWS_SECRET_ACCESS_KEY"), None);
        assert_eq!(get("DATABASE_URL"), Some("postgresql://sortie_agent@h/db"));
        assert_eq!(get("SORTIE_STEP_ID"), Some("7"));
        assert_eq!(get("SORTIE_ROLE"), Some("worker"));
        let mcp = config_with_mcp();
        let connection = Connection::for_agents(&mcp, "postgresql://runner:secret@h/db");
        let env = agent_env(&session, &mcp, &connection, &runner_env);
        assert!(env.iter().all(|(k, _)| k != "DATABASE_URL"), "{env:?}");
        assert!(env
            .iter()
            .any(|(k, v)| k == "SORTIE_MCP_URL" && v == "http://127.0.0.1:8765/mcp"));
    }

    fn config_with_mcp() -> Config {
        config(&[("SORTIE_MCP_URL", "http://127.0.0.1:8765/mcp")])
    }

    #[test]
    fn the_mcp_config_file_is_private_and_removed_with_its_guard() {
        let value = json!({"mcpServers": {}});
        let file = McpConfigFile::write(1, &value).unwrap();
        let mode = std::fs::metadata(&file.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let path = file.path.clone();
        drop(file);
        assert!(!path.exists());
    }
}
