//! The connection to the database: a pool, the embedded default when no DATABASE_URL is set,
//! and the mapping from the extension's SQLSTATEs to stable error codes.

use std::str::FromStr;

use anyhow::{Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use crate::config::{Config, Env};
use crate::embedded::{bin_dir, default_root, Cluster};

/// The embedded default's database.
pub const EMBEDDED_DATABASE: &str = "sortie";

#[derive(Clone)]
pub struct Db {
    pool: Pool,
    schema: String,
    connection_string: String,
}

/// Where to connect: DATABASE_URL, or the embedded cluster (started and prepared on demand).
pub fn resolve_connection_string(config: &Config) -> Result<String> {
    if let Some(url) = &config.database_url {
        return Ok(url.clone());
    }
    let env = Env::get();
    let cluster = Cluster::new(default_root(env)?, bin_dir(env.pg_bin.as_deref())?);
    cluster
        .ensure_running()
        .context("starting the embedded PostgreSQL cluster")?;
    Ok(cluster.connection_string(EMBEDDED_DATABASE))
}

impl Db {
    pub async fn connect(config: &Config) -> Result<Db> {
        let embedded = config.database_url.is_none();
        let connection_string = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || resolve_connection_string(&config)).await??
        };
        if embedded {
            prepare_embedded(&connection_string).await?;
        }
        let mut pg_config = tokio_postgres::Config::from_str(&connection_string)
            .map_err(|e| anyhow::anyhow!("DATABASE_URL: {}", with_causes(&e)))?;
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(CONNECT_TIMEOUT);
        }
        let source = if embedded {
            "the embedded cluster (DATABASE_URL is unset)"
        } else {
            "DATABASE_URL"
        };
        check_database(&pg_config, &config.schema, source).await?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager).max_size(16).build()?;
        Ok(Db {
            pool,
            schema: config.schema.clone(),
            connection_string,
        })
    }

    /// What agents and the event listener connect with: DATABASE_URL, or the embedded
    /// cluster's socket.
    pub fn connection_string(&self) -> &str {
        &self.connection_string
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Calls one extension function returning jsonb: `call("claim_next(owner => $1)", ...)`.
    /// The schema is prefixed here; the statement is prepared once per connection.
    pub async fn call(
        &self,
        function_call: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Value, DbError> {
        let sql = format!("SELECT {}.{function_call}", self.schema);
        self.query_value(&sql, params).await
    }

    /// Runs a statement returning one jsonb value; `{schema}` in the text names the
    /// extension's schema.
    pub async fn query_value(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Value, DbError> {
        let client = self.live_client().await?;
        let statement = client
            .prepare_cached(&sql.replace("{schema}", &self.schema))
            .await
            .map_err(DbError::from)?;
        match client.query_one(&statement, params).await {
            Ok(row) => Ok(row.get::<_, Option<Value>>(0).unwrap_or(Value::Null)),
            Err(e) => {
                let error = DbError::after_sent(e);
                if error.code == "in_doubt" {
                    // Never handed out again: the next call (a retry) gets a fresh connection.
                    drop(deadpool_postgres::Object::take(client));
                }
                Err(error)
            }
        }
    }

    /// A pooled connection whose session is still open: one the server ended while it sat
    /// in the pool is dropped, so that a call is never sent down a dead connection (which would
    /// leave it `in_doubt` when it never ran).
    async fn live_client(&self) -> Result<deadpool_postgres::Object, DbError> {
        for _ in 0..4 {
            let client = self.pool.get().await.map_err(DbError::unavailable)?;
            if !client.is_closed() {
                return Ok(client);
            }
            drop(deadpool_postgres::Object::take(client));
        }
        self.pool.get().await.map_err(DbError::unavailable)
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(DbError::unavailable)
    }
}

/// How long a start-up connection attempt may take when DATABASE_URL does not say.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The command that installs the extension into a database, in every message that needs it.
pub const INSTALL_EXTENSION: &str = "CREATE EXTENSION sortie CASCADE";

/// An error and its causes on one line: tokio-postgres keeps the reason ("Connection
/// refused", "invalid port") in the source, not in its own message.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// Where a connection string points, without its password: for messages.
fn describe_target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config.get_ports().get(i).or(config.get_ports().first());
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            match host {
                Host::Tcp(name) => format!("{name}{port}"),
                Host::Unix(path) => format!("socket {}{port}", path.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost".to_string()
    } else {
        hosts.join(",")
    };
    let database = config.get_dbname().or(config.get_user()).unwrap_or("?");
    format!("{hosts} (database {database:?})")
}

/// Start-up check (SPEC §9): the server answers and the extension is installed in the
/// configured schema, so a bad DATABASE_URL or a missing extension stops the program before
/// it serves anything, with a message naming the variable and the fix.
async fn check_database(config: &tokio_postgres::Config, schema: &str, source: &str) -> Result<()> {
    let target = describe_target(config);
    let (client, connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(e) => match e.as_db_error() {
            Some(db) => anyhow::bail!(
                "{source}: the server at {target} refused the connection: {} ({})",
                db.message(),
                db.code().code()
            ),
            None => anyhow::bail!("{source}: cannot reach {target}: {}", with_causes(&e)),
        },
    };
    tokio::spawn(connection);
    let installed = client
        .query_opt(
            // The schema holding the extension's tables; not pg_extension's own schema, which
            // is `public` when the default put the objects in `sortie` (bootstrap.sql).
            "SELECT coalesce((SELECT n.nspname::text
                                FROM pg_depend d
                                JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
                                JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
                                 AND d.deptype = 'e' AND c.relname = 'campaigns'), '')
               FROM pg_extension e WHERE e.extname = 'sortie'",
            &[],
        )
        .await
        .with_context(|| format!("{source}: querying {target}"))?;
    match installed {
        Some(row) => {
            let installed_in: String = row.get(0);
            if installed_in != schema {
                anyhow::bail!(
                    "SORTIE_SCHEMA: the sortie extension in {target} is installed in schema \"{installed_in}\", not \"{schema}\": set SORTIE_SCHEMA={installed_in}"
                );
            }
            check_functions(&client, schema, &target, source).await
        }
        None => {
            let available = client
                .query_opt(
                    "SELECT 1 FROM pg_available_extensions WHERE name = 'sortie'",
                    &[],
                )
                .await?
                .is_some();
            if available {
                anyhow::bail!(
                    "{source}: the database {target} does not have the sortie extension: install it with {INSTALL_EXTENSION}; as the database owner or a superuser (psql \"$DATABASE_URL\" -c '{INSTALL_EXTENSION}')"
                )
            }
            anyhow::bail!(
                "{source}: the server at {target} has no sortie extension to install: run scripts/setup --extension on the database machine, then {INSTALL_EXTENSION}; in the database"
            )
        }
    }
}

include!(concat!(env!("OUT_DIR"), "/extension_functions.rs"));

/// Start-up check: every SQL function of the extension these binaries were built with is in
/// the database. A database whose extension was created by an older build of the same version
/// (a development build: `ALTER EXTENSION sortie UPDATE` has no newer version to go to) lacks
/// the newer functions, and every call of one would fail at run time, a runner's records
/// among them; it stops here instead, naming them and the fix.
async fn check_functions(
    client: &tokio_postgres::Client,
    schema: &str,
    target: &str,
    source: &str,
) -> Result<()> {
    let names: Vec<&str> = EXTENSION_FUNCTIONS.to_vec();
    let row = client
        .query_one(
            "SELECT coalesce(array_agg(n ORDER BY n), '{}'),
                    (SELECT extversion FROM pg_extension WHERE extname = 'sortie')
               FROM unnest($1::text[]) n
              WHERE NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace
                                 WHERE s.nspname = $2 AND p.proname = n)",
            &[&names, &schema],
        )
        .await
        .with_context(|| format!("{source}: querying {target}"))?;
    let missing: Vec<String> = row.get(0);
    if missing.is_empty() {
        return Ok(());
    }
    let version: String = row.get(1);
    let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    anyhow::bail!(
        "{source}: the sortie extension {version} in {target} lacks {} function(s) these binaries call ({}{}): it was created by an older build than these binaries. \
         If that build had another version, run ALTER EXTENSION sortie UPDATE; in the database. With the same version (a development build) there is nothing to update to: \
         recreate the extension in a database whose data you can lose (DROP EXTENSION sortie CASCADE; CREATE EXTENSION sortie CASCADE;), or for the embedded default remove its data directory's pgdata",
        missing.len(),
        shown.join(", "),
        if missing.len() > shown.len() { ", …" } else { "" }
    )
}

/// The embedded cluster's database and extension, created on first use.
async fn prepare_embedded(connection_string: &str) -> Result<()> {
    let admin_string =
        connection_string.replace(&format!("dbname={EMBEDDED_DATABASE}"), "dbname=postgres");
    let (admin, connection) = tokio_postgres::connect(&admin_string, NoTls)
        .await
        .context("connecting to the embedded cluster")?;
    tokio::spawn(connection);
    let exists = admin
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&EMBEDDED_DATABASE],
        )
        .await?
        .is_some();
    if !exists {
        // Two processes may race here; the loser's "already exists" is fine.
        if let Err(e) = admin
            .batch_execute(&format!("CREATE DATABASE {EMBEDDED_DATABASE}"))
            .await
        {
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(e.into());
            }
        }
    }
    let (client, connection) = tokio_postgres::connect(connection_string, NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("SELECT pg_advisory_lock(4242); CREATE EXTENSION IF NOT EXISTS sortie CASCADE; \
             ALTER EXTENSION sortie UPDATE; SELECT pg_advisory_unlock(4242)")
        .await
        .context("creating the sortie extension in the embedded database (run scripts/setup to install it)")?;
    Ok(())
}

/// A failed call: the stable code (SPEC §5) and a sentence for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.starts_with(&self.code) {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for DbError {}

/// The stable code of a SQLSTATE: the extension's own (class SR) from the one error table in
/// `sortie_core` (ERROR_CODES, which `_raise()` is tested against), then PostgreSQL's own.
pub fn code_for_sqlstate(sqlstate: &str) -> Option<&'static str> {
    if let Some(code) = sortie_core::code_for_sqlstate(sqlstate) {
        return Some(code);
    }
    Some(match sqlstate {
        // Bad input the extension's types caught before a rule ran.
        "22P02" | "22003" | "22023" | "22007" | "22008" | "22021" | "22P05" | "23514" => {
            "invalid_argument"
        }
        // SPEC §15: the login holds no role that may call this function (or read that table).
        "42501" => "forbidden",
        "40001" | "40P01" => "conflict",
        // The server is shutting down, restarting or not yet accepting connections: the call
        // did not happen, and the same call can be made again once it is back.
        "57P01" | "57P02" | "57P03" => "unavailable",
        s if s.starts_with("08") => "unavailable",
        _ => return None,
    })
}

impl DbError {
    pub fn unavailable(e: impl std::fmt::Display) -> DbError {
        DbError {
            code: "unavailable".into(),
            message: format!("the database is not reachable ({e}); retry shortly"),
        }
    }

    /// An error of a call that was already sent (SPEC §14): when the connection was lost, the
    /// call may have committed before its reply was lost, so it is `in_doubt`, never
    /// `unavailable` (which says it did not happen). The rules' own refusals keep their codes.
    pub fn after_sent(e: tokio_postgres::Error) -> DbError {
        // Lost: no answer from the server (closed, reset), or the server ending the session.
        let lost = match e.as_db_error() {
            None => true,
            Some(db) => {
                let code = db.code().code();
                code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
            }
        };
        let error = DbError::from(e);
        if !lost {
            return error;
        }
        DbError {
            code: "in_doubt".into(),
            message: format!(
                "in_doubt: the connection to the database was lost after the call was sent ({}); it may have taken effect; repeat it with the same request_id",
                error.message
            ),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> DbError {
        match e.as_db_error() {
            // The extension's schema is gone (dropped after start, or the wrong SORTIE_SCHEMA):
            // nothing happened, and the same call works once it is installed again.
            Some(db) if db.code() == &tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME => {
                DbError {
                    code: "unavailable".into(),
                    message: format!(
                        "{}: the sortie extension is not installed in this database; install it with {INSTALL_EXTENSION}; (or set SORTIE_SCHEMA to the schema it is in)",
                        db.message()
                    ),
                }
            }
            Some(db) if db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => {
                DbError {
                    code: "forbidden".into(),
                    message: format!(
                        "forbidden: {}: the database login holds no sortie role allowed to make this call (docs/security.md)",
                        db.message()
                    ),
                }
            }
            Some(db) => match code_for_sqlstate(db.code().code()) {
                Some(code) => DbError {
                    code: code.into(),
                    message: db.message().to_string(),
                },
                None => DbError {
                    code: "internal".into(),
                    message: format!("{} ({})", db.message(), db.code().code()),
                },
            },
            None => DbError::unavailable(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::code_for_sqlstate;

    #[test]
    fn a_server_going_away_is_unavailable_and_the_rules_keep_their_codes() {
        for sqlstate in ["57P01", "57P02", "57P03", "08006", "08001"] {
            assert_eq!(
                code_for_sqlstate(sqlstate),
                Some("unavailable"),
                "{sqlstate}"
            );
        }
        assert_eq!(code_for_sqlstate("SR003"), Some("stale_claim"));
        assert_eq!(code_for_sqlstate("23514"), Some("invalid_argument"));
        assert_eq!(code_for_sqlstate("42P01"), None);
    }
}
