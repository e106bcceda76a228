//! The web view of `sortie-mcp --http` (SPEC §16): the campaigns, one campaign's DAG drawn by
//! the server (view::svg) and redrawn live from `sortie_events` over server-sent events, and a
//! step's details on click. The page, its script and its style are compiled into the binary;
//! nothing is fetched from elsewhere. Every route takes the MCP bearer token, also as
//! `?token=` (which sets an HttpOnly cookie, so the page's own requests carry it) or that
//! cookie, since a browser cannot add an Authorization header to a typed address.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::db::{Db, DbError};
use crate::view::graph::Graph;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");
const COOKIE: &str = "sortie_token";

/// The web view's routes, with their own check of the token.
pub fn router(db: Db, token: &str) -> Router {
    let token: Arc<str> = token.into();
    Router::new()
        .route("/", get(index))
        .route(
            "/assets/app.js",
            get(|| asset(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/assets/app.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .route("/api/campaigns", get(campaigns))
        .route("/api/campaigns/{id}", get(campaign))
        .route("/api/steps/{id}/output", get(step_output))
        .route("/api/events", get(events))
        .with_state(db)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let token = token.clone();
            async move { authorize(&token, request, next).await }
        }))
}

/// `%XX` and `+` decoded; the token is compared after this.
fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the request presents the token: `(token, came in the query)`.
pub fn presented_token(
    authorization: Option<&str>,
    query: Option<&str>,
    cookies: Option<&str>,
) -> Option<(String, bool)> {
    if let Some(bearer) = authorization.and_then(|a| a.strip_prefix("Bearer ")) {
        return Some((bearer.to_string(), false));
    }
    if let Some(token) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("token=").map(percent_decode))
    {
        return Some((token, true));
    }
    cookies
        .into_iter()
        .flat_map(|c| c.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_string)
        })
        .map(|t| (t, false))
}

async fn authorize(expected: &str, request: Request, next: Next) -> Response {
    let presented = {
        let headers = request.headers();
        let header_text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        presented_token(
            header_text(header::AUTHORIZATION),
            request.uri().query(),
            header_text(header::COOKIE),
        )
    };
    let Some((token, from_query)) =
        presented.filter(|(t, _)| crate::http::constant_time_eq(t.as_bytes(), expected.as_bytes()))
    else {
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, "Bearer realm=\"sortie-mcp\""),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            ],
            "missing or wrong token: open /?token=<SORTIE_HTTP_TOKEN> once, or send Authorization: Bearer <token>\n",
        )
            .into_response();
    };
    let mut response = next.run(request).await;
    if from_query {
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        INDEX,
    )
        .into_response()
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        value.to_string(),
    )
        .into_response()
}

fn error_response(e: &DbError) -> Response {
    let status = match e.code.as_str() {
        "not_found" => StatusCode::NOT_FOUND,
        "invalid_argument" => StatusCode::BAD_REQUEST,
        "unavailable" | "in_doubt" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(
        status,
        &json!({"error": {"code": e.code, "message": e.to_string()}}),
    )
}

fn bad_request(message: String) -> Response {
    error_response(&DbError {
        code: "invalid_argument".into(),
        message: format!("invalid_argument: {message}"),
    })
}

async fn campaigns(State(db): State<Db>) -> Response {
    match db.call("list_campaigns(\"limit\" => 200)", &[]).await {
        Ok(answer) => json_response(StatusCode::OK, &answer),
        Err(e) => error_response(&e),
    }
}

/// The campaign's graph and its drawing, in one answer so they always agree.
async fn campaign(State(db): State<Db>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return bad_request(format!("{id:?} is not a campaign id"));
    };
    match db.call("_campaign_graph_delegated($1)", &[&id]).await {
        Ok(answer) => {
            let svg = Graph::from_json(&answer)
                .map(|g| crate::view::svg::svg(&g))
                .unwrap_or_default();
            json_response(StatusCode::OK, &json!({"graph": answer, "svg": svg}))
        }
        Err(e) => error_response(&e),
    }
}

async fn step_output(State(db): State<Db>, Path(id): Path<String>) -> Response {
    let Some(id) = id.parse::<i64>().ok().filter(|n| *n > 0) else {
        return bad_request(format!("{id:?} is not a step id"));
    };
    match db
        .call("read_step_output($1, \"limit\" => 8000)", &[&id])
        .await
    {
        Ok(answer) => json_response(StatusCode::OK, &answer),
        Err(e) => error_response(&e),
    }
}

/// Server-sent events: each event of the log as `data: {id, campaign_id, step_id, kind}`,
/// read after a `sortie_events` wake-up (and for a second after it, since the extension wakes
/// listeners at most once per `wake_interval()` a connection) or every few seconds.
async fn events(
    State(db): State<Db>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut wake = crate::runner::listener::listen(db.connection_string()).await;
        let mut after: Option<String> = match db.call("events(\"limit\" => 1)", &[]).await {
            // A position that holds on every node (on Citus too): `next_after`.
            Ok(page) => page["next_after"].as_str().map(String::from),
            Err(_) => None,
        };
        if tx
            .send(Event::default().event("ready").data("{}"))
            .await
            .is_err()
        {
            return;
        }
        let mut poll_until = tokio::time::Instant::now();
        loop {
            let pause = if tokio::time::Instant::now() < poll_until {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(5)
            };
            tokio::select! {
                woke = wake.recv() => {
                    if woke.is_none() { return; }
                    poll_until = tokio::time::Instant::now() + Duration::from_secs(1);
                }
                _ = tokio::time::sleep(pause) => {}
                _ = tx.closed() => return,
            }
            let Ok(page) = db
                .call("events(after => $1, \"limit\" => 1000)", &[&after])
                .await
            else {
                continue;
            };
            if let Some(next) = page["next_after"].as_str() {
                after = Some(next.to_string());
            }
            for event in page["events"].as_array().into_iter().flatten() {
                let brief = json!({"id": event["id"], "campaign_id": event["campaign_id"],
                                   "step_id": event["step_id"], "kind": event["kind"]});
                if tx
                    .send(Event::default().data(brief.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_taken_from_the_header_the_query_or_the_cookie() {
        assert_eq!(
            presented_token(Some("Bearer abc"), Some("token=zzz"), None),
            Some(("abc".into(), false))
        );
        assert_eq!(
            presented_token(None, Some("x=1&token=a%2Bb%20c"), None),
            Some(("a+b c".into(), true))
        );
        assert_eq!(
            presented_token(None, None, Some("other=1; sortie_token=s3cret")),
            Some(("s3cret".into(), false))
        );
        assert_eq!(presented_token(None, Some("x=1"), Some("other=1")), None);
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn the_page_uses_only_its_own_assets() {
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(
                !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn")
            );
        }
        assert!(INDEX.contains("/assets/app.js") && INDEX.contains("/assets/app.css"));
    }
}
