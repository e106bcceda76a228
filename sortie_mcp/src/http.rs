//! The optional streamable HTTP transport (`sortie-mcp --http ADDR`), so remote agents can
//! share one server. Every request must carry `Authorization: Bearer $SORTIE_HTTP_TOKEN`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tracing::info;

use crate::tools::SortieServer;

pub async fn serve(server: SortieServer, addr: SocketAddr, token: Option<String>) -> Result<()> {
    let Some(token) = token.filter(|t| t.len() >= 16) else {
        bail!("--http needs SORTIE_HTTP_TOKEN set to a secret of at least 16 characters");
    };
    // Start-up check: the database is reached before the address is bound.
    server.connect_now().await?;
    // SPEC §16: the web view at `/`, beside MCP at `/mcp`; it checks the same token itself.
    let web = crate::web::router(server.database().await?, &token);
    let expected: Arc<str> = format!("Bearer {token}").into();
    // Sessions share the template server's database pool and tool router.
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default().with_allowed_hosts([
            "localhost",
            "127.0.0.1",
            "::1",
            &addr.ip().to_string(),
        ]),
    );
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let expected = expected.clone();
            async move { authorize(&expected, request, next).await }
        }))
        .merge(web);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    info!(address = %listener.local_addr()?, "serving MCP over streamable HTTP at /mcp");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn authorize(expected: &str, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), expected.as_bytes())) {
        // RFC 6750 §3: a 401 names the scheme the client must use (SPEC §14).
        return (
            StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"sortie-mcp\"",
            )],
            "missing or wrong bearer token\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Comparison whose time does not depend on where the strings differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
