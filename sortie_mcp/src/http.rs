//! The optional streamable HTTP transport (`sortie-mcp --http ADDR`), so remote agents can
//! share one server (SPEC §5), behind the trust boundary of SPEC §15:
//!
//! * Bearer tokens carry a role: `SORTIE_HTTP_TOKEN` (role both) and the lines of
//!   `SORTIE_HTTP_TOKENS_FILE` (`role token`, or `role sha256:<hex>` stored hashed). A session
//!   lists its role's tools. A claim token presented as the bearer opens a worker session bound
//!   to that step (its step and campaign are read from the claim in the database).
//! * Each bearer has a session manager of its own, so a session id works only with the bearer
//!   that opened it. Idle sessions expire, and their number is capped: the oldest idle goes.
//! * `Origin` must be in `SORTIE_HTTP_ALLOWED_ORIGINS` or a loopback origin of this server's
//!   port (else 403); `Host` must be a loopback name, the bound address or one of
//!   `SORTIE_HTTP_ALLOWED_HOSTS` (DNS rebinding; else 403).
//! * A non-loopback address needs `--allow-remote`, and plain HTTP must then sit behind TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::Role;
use crate::tools::{Binding, SortieServer};

/// How long an idle session is kept, and how many are kept at most, by default.
const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
const MAX_SESSIONS: usize = 1000;

/// One accepted bearer token.
#[derive(Debug, Clone)]
pub struct Token {
    pub role: Role,
    secret: Secret,
}

#[derive(Debug, Clone)]
enum Secret {
    Plain(String),
    Sha256([u8; 32]),
}

impl Token {
    fn matches(&self, presented: &str) -> bool {
        match &self.secret {
            Secret::Plain(secret) => constant_time_eq(presented.as_bytes(), secret.as_bytes()),
            Secret::Sha256(hash) => {
                constant_time_eq(Sha256::digest(presented.as_bytes()).as_slice(), hash)
            }
        }
    }
}

/// What `--http` reads from the environment, checked before anything is served.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub tokens: Vec<Token>,
    /// SORTIE_HTTP_TOKEN itself, for the web view (SPEC §16), which checks it on its own.
    pub web_token: Option<String>,
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub session_idle: Duration,
    pub max_sessions: usize,
}

fn parse_role(word: &str) -> Option<Role> {
    match word {
        "coordinator" => Some(Role::Coordinator),
        "worker" => Some(Role::Worker),
        "both" => Some(Role::Both),
        _ => None,
    }
}

fn list(raw: Option<String>) -> Vec<String> {
    raw.unwrap_or_default()
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

impl HttpSettings {
    pub fn from_env() -> Result<HttpSettings> {
        Self::from_vars(&crate::config::var)
    }

    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<HttpSettings> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let mut tokens = Vec::new();
        let web_token = var("SORTIE_HTTP_TOKEN").map(|t| t.trim().to_string());
        if let Some(token) = &web_token {
            if token.len() < 16 {
                bail!("SORTIE_HTTP_TOKEN is invalid: use a secret of at least 16 characters");
            }
            tokens.push(Token {
                role: Role::Both,
                secret: Secret::Plain(token.clone()),
            });
        }
        if let Some(path) = var("SORTIE_HTTP_TOKENS_FILE") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("SORTIE_HTTP_TOKENS_FILE={path:?} cannot be read"))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let (Some(role), Some(secret), None) = (words.next(), words.next(), words.next())
                else {
                    bail!("SORTIE_HTTP_TOKENS_FILE {path}:{}: expected `role token` or `role sha256:<hex>`", n + 1);
                };
                let Some(role) = parse_role(role) else {
                    bail!("SORTIE_HTTP_TOKENS_FILE {path}:{}: role {role:?} is not coordinator, worker or both", n + 1);
                };
                let secret = match secret.strip_prefix("sha256:") {
                    Some(hex) => Secret::Sha256(decode_sha256(hex).with_context(|| {
                        format!(
                            "SORTIE_HTTP_TOKENS_FILE {path}:{}: sha256: needs 64 hex digits",
                            n + 1
                        )
                    })?),
                    None if secret.len() >= 16 => Secret::Plain(secret.to_string()),
                    None => bail!(
                        "SORTIE_HTTP_TOKENS_FILE {path}:{}: a token needs at least 16 characters",
                        n + 1
                    ),
                };
                tokens.push(Token { role, secret });
            }
        }
        if tokens.is_empty() {
            bail!("--http needs SORTIE_HTTP_TOKEN set to a secret of at least 16 characters, or tokens in SORTIE_HTTP_TOKENS_FILE");
        }
        let number = |name: &str, default: u64| -> Result<u64> {
            match var(name) {
                None => Ok(default),
                Some(raw) => raw
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "{name}={raw:?} is invalid: expected a positive whole number"
                        )
                    }),
            }
        };
        Ok(HttpSettings {
            tokens,
            web_token,
            allowed_origins: list(var("SORTIE_HTTP_ALLOWED_ORIGINS")),
            allowed_hosts: list(var("SORTIE_HTTP_ALLOWED_HOSTS")),
            session_idle: Duration::from_secs(number(
                "SORTIE_HTTP_SESSION_IDLE",
                SESSION_IDLE.as_secs(),
            )?),
            max_sessions: number("SORTIE_HTTP_MAX_SESSIONS", MAX_SESSIONS as u64)? as usize,
        })
    }
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Who opened a session: a configured token (by its index), or a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Principal {
    Token(usize),
    Claim(uuid::Uuid),
}

type Mcp = StreamableHttpService<SortieServer, LocalSessionManager>;

/// One bearer's MCP service and its sessions.
struct Door {
    service: Mcp,
    sessions: Arc<LocalSessionManager>,
}

struct Gate {
    settings: HttpSettings,
    base: SortieServer,
    rmcp_config: StreamableHttpServerConfig,
    doors: Mutex<HashMap<Principal, Arc<Door>>>,
    /// Every open session: whose it is and when it was last used.
    sessions: Mutex<HashMap<String, (Principal, Instant)>>,
    own_origins: Vec<String>,
    hosts: Vec<String>,
}

pub async fn serve(
    server: SortieServer,
    addr: SocketAddr,
    allow_remote: bool,
    settings: HttpSettings,
) -> Result<()> {
    if !addr.ip().is_loopback() {
        if !allow_remote {
            bail!("--http {addr} is not a loopback address: add --allow-remote to serve other machines (behind TLS)");
        }
        warn!(address = %addr, "serving plain HTTP beyond this machine: put it behind a TLS-terminating proxy, or bearer tokens and claim tokens travel in clear text");
    }
    // Start-up check: the database is reached before the address is bound.
    server.connect_now().await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let port = bound.port();
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    hosts.push(addr.ip().to_string());
    hosts.extend(settings.allowed_hosts.iter().cloned());
    let own_origins = ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .map(|h| format!("http://{h}:{port}"))
        .collect();
    let rmcp_config = StreamableHttpServerConfig::default().with_allowed_hosts(
        hosts
            .iter()
            .flat_map(|h| [h.clone(), format!("{h}:{port}"), format!("[{h}]:{port}")]),
    );
    // SPEC §16: the web view at `/`, beside MCP at `/mcp`; it checks SORTIE_HTTP_TOKEN itself.
    let web_token = settings.web_token.clone().unwrap_or_else(|| {
        info!("the web view needs SORTIE_HTTP_TOKEN; it is closed");
        uuid::Uuid::new_v4().to_string() + &uuid::Uuid::new_v4().to_string()
    });
    let web = crate::web::router(server.database().await?, &web_token);
    let gate = Arc::new(Gate {
        settings,
        base: server,
        rmcp_config,
        doors: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        own_origins,
        hosts,
    });
    let mcp_gate = gate.clone();
    let app = axum::Router::new()
        .route(
            "/mcp",
            axum::routing::any(move |request: Request| {
                let gate = mcp_gate.clone();
                async move { gate.mcp(request).await }
            }),
        )
        .merge(web)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let gate = gate.clone();
            async move {
                match gate.check_origin_and_host(request.headers()) {
                    Ok(()) => next.run(request).await,
                    Err(refusal) => refuse(StatusCode::FORBIDDEN, refusal),
                }
            }
        }));
    info!(address = %bound, "serving MCP over streamable HTTP at /mcp");
    axum::serve(listener, app).await?;
    Ok(())
}

fn refuse(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

fn unauthorized() -> Response {
    // RFC 6750 §3: a 401 names the scheme the client must use (SPEC §14).
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"sortie-mcp\"")],
        "missing or wrong bearer token\n",
    )
        .into_response()
}

/// The token of an `Authorization: Bearer <token>` header; the scheme in any case (RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Gate {
    /// SPEC §15: a browser page of another origin must not drive this server, and a name
    /// that resolves here by DNS rebinding must not either.
    fn check_origin_and_host(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            let host = host.trim().to_ascii_lowercase();
            let name = match host.strip_prefix('[') {
                Some(rest) => rest.split(']').next().unwrap_or_default().to_string(),
                None => host
                    .rsplit_once(':')
                    .map_or(host.clone(), |(n, _)| n.to_string()),
            };
            if !self.hosts.iter().any(|h| *h == host || *h == name) {
                return Err("Host not allowed (SORTIE_HTTP_ALLOWED_HOSTS)\n");
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin
                .to_str()
                .unwrap_or_default()
                .trim()
                .trim_end_matches('/')
                .to_ascii_lowercase();
            let allowed = self.own_origins.contains(&origin)
                || self.settings.allowed_origins.contains(&origin);
            if !allowed {
                return Err("Origin not allowed (SORTIE_HTTP_ALLOWED_ORIGINS)\n");
            }
        }
        Ok(())
    }

    async fn mcp(self: Arc<Self>, request: Request) -> Response {
        let Some(presented) = bearer(request.headers()).map(str::to_string) else {
            return unauthorized();
        };
        let session_id = request
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let principal = match self
            .settings
            .tokens
            .iter()
            .position(|t| t.matches(&presented))
        {
            Some(index) => Principal::Token(index),
            None => match uuid::Uuid::parse_str(&presented) {
                Ok(claim) => Principal::Claim(claim),
                Err(_) => return unauthorized(),
            },
        };
        let door = match self.door(principal, session_id.is_none()).await {
            Ok(door) => door,
            Err(refusal) => return refusal,
        };
        if let Some(id) = &session_id {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            match sessions.get_mut(id) {
                Some((owner, used)) if *owner == principal => *used = Instant::now(),
                // Another bearer's session, or one that expired: not found for this bearer.
                _ => return refuse(StatusCode::NOT_FOUND, "no such session for this bearer\n"),
            }
        }
        let deleting = request.method() == axum::http::Method::DELETE;
        let response = door.service.handle(request).await.map(Body::new);
        if deleting {
            if let Some(id) = &session_id {
                self.sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
            }
        }
        if session_id.is_none() {
            if let Some(id) = response
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
            {
                self.opened(id.to_string(), principal).await;
            }
        }
        response
    }

    /// The bearer's service, made on first use. A claim is checked in the database whenever
    /// it opens a session: only the current claim of a running step opens one.
    async fn door(&self, principal: Principal, opening: bool) -> Result<Arc<Door>, Response> {
        let binding = match principal {
            Principal::Claim(token) if opening => match self.claim_binding(token).await {
                Some(binding) => Some(binding),
                None => return Err(unauthorized()),
            },
            _ => None,
        };
        let mut doors = self.doors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(door) = doors.get(&principal) {
            return Ok(door.clone());
        }
        let template = match (principal, binding) {
            (Principal::Token(index), _) => self.base.for_role(self.settings.tokens[index].role),
            (Principal::Claim(_), Some(binding)) => self.base.bound_worker(binding),
            // A session id of a claim this server never opened a session for.
            (Principal::Claim(_), None) => return Err(unauthorized()),
        };
        let mut manager = LocalSessionManager::default();
        manager.session_config.keep_alive = Some(self.settings.session_idle);
        let sessions = Arc::new(manager);
        let service = StreamableHttpService::new(
            move || Ok(template.new_session()),
            sessions.clone(),
            self.rmcp_config.clone(),
        );
        let door = Arc::new(Door { service, sessions });
        doors.insert(principal, door.clone());
        Ok(door)
    }

    async fn claim_binding(&self, token: uuid::Uuid) -> Option<Binding> {
        let db = self.base.database().await.ok()?;
        let claim = db
            .call("claim_session(claim_token => $1)", &[&token])
            .await
            .ok()?;
        Some(Binding {
            step_id: claim["step_id"].as_i64(),
            campaign_id: claim["campaign_id"]
                .as_str()
                .and_then(|c| uuid::Uuid::parse_str(c).ok()),
            claim_token: Some(token),
            assigned: true,
            claim_over: false,
        })
    }

    /// Records a new session; past the cap, or idle too long, sessions are closed (the
    /// oldest idle first).
    async fn opened(&self, id: String, principal: Principal) {
        let closing: Vec<(String, Principal)> = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.insert(id, (principal, Instant::now()));
            let idle = self.settings.session_idle;
            let mut closing: Vec<(String, Principal)> = sessions
                .iter()
                .filter(|(_, (_, used))| used.elapsed() > idle)
                .map(|(id, (p, _))| (id.clone(), *p))
                .collect();
            for (id, _) in &closing {
                sessions.remove(id);
            }
            while sessions.len() > self.settings.max_sessions {
                let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(id, (p, _))| (id.clone(), *p))
                else {
                    break;
                };
                sessions.remove(&oldest.0);
                closing.push(oldest);
            }
            closing
        };
        for (id, principal) in closing {
            let door = self
                .doors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&principal)
                .cloned();
            if let Some(door) = door {
                let _ = door.sessions.close_session(&id.into()).await;
            }
        }
    }
}

/// Comparison whose time does not depend on where the strings differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "bEaReR  secret-token".parse().unwrap(),
        );
        assert_eq!(bearer(&headers), Some("secret-token"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn a_tokens_file_gives_roles_and_hashed_tokens() {
        let dir = std::env::temp_dir().join(format!("sortie-http-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        let hash = Sha256::digest(b"a-worker-token-long-enough");
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            &file,
            format!("# comment\ncoordinator coordinator-token-long\n\nworker sha256:{hex}\n"),
        )
        .unwrap();
        let path = file.display().to_string();
        let settings = HttpSettings::from_vars(&|name| {
            (name == "SORTIE_HTTP_TOKENS_FILE").then(|| path.clone())
        })
        .unwrap();
        assert_eq!(settings.tokens.len(), 2);
        assert_eq!(settings.tokens[0].role, Role::Coordinator);
        assert!(settings.tokens[0].matches("coordinator-token-long"));
        assert!(settings.tokens[1].matches("a-worker-token-long-enough"));
        assert!(!settings.tokens[1].matches(&hex));
        std::fs::write(&file, "admin some-token-long-enough\n").unwrap();
        let err = HttpSettings::from_vars(&|name| {
            (name == "SORTIE_HTTP_TOKENS_FILE").then(|| path.clone())
        })
        .unwrap_err();
        assert!(err.to_string().contains(":1"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
