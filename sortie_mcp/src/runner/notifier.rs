//! Notifications to a Discord-compatible webhook (SPEC §6, §13), retried with back-off by the
//! extension; marked delivered only on success, given up on a refusal or after 10 attempts.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::json;
use tracing::warn;

use crate::db::Db;

/// Discord refuses message content over 2,000 characters (SPEC §13).
pub const CONTENT_LIMIT: usize = 2000;

/// Without SORTIE_WEBHOOK_URL the runner's log is the sink: each notification is written there
/// (stderr, through tracing) and marked delivered, so that a default install's `sortie doctor`
/// does not report every finished campaign's notification as undelivered. Runners sharing a
/// database should all have the webhook or none (docs/decisions.md).
pub async fn deliver(db: &Db, http: &reqwest::Client, webhook: Option<&str>) -> Result<()> {
    let Some(webhook) = webhook else {
        let batch = db
            .call(
                "take_notifications(\"limit\" => 100, lease_seconds => 60)",
                &[],
            )
            .await?;
        for n in batch.as_array().into_iter().flatten() {
            let id = n["id"].as_i64().unwrap_or_default();
            tracing::info!(
                notification = id,
                campaign = %n["campaign_id"],
                channel = %n["channel"],
                level = %n["level"],
                message = n["message"].as_str().unwrap_or_default(),
                "notification (no SORTIE_WEBHOOK_URL: logged here)"
            );
            let none: Option<String> = None;
            db.call(
                "notification_delivered(id => $1, ok => true, error => $2, retry => false)",
                &[&id, &none],
            )
            .await?;
        }
        return Ok(());
    };
    // The batch's lease outlasts its slowest delivery (20 posts of at most 15 s), so another
    // runner never posts one of them again meanwhile.
    let batch = db
        .call(
            "take_notifications(\"limit\" => 20, lease_seconds => 330)",
            &[],
        )
        .await?;
    for n in batch.as_array().into_iter().flatten() {
        let id = n["id"].as_i64().unwrap_or_default();
        let body = json!({
            "content": content(n["level"].as_str().unwrap_or("info"), n["message"].as_str().unwrap_or_default()),
            "channel": n["channel"],
            "campaign_id": n["campaign_id"],
            "level": n["level"],
        });
        let outcome = http
            .post(webhook)
            .timeout(std::time::Duration::from_secs(15))
            .json(&body)
            .send()
            .await;
        let (ok, retry, error): (bool, bool, Option<String>) = match outcome {
            Ok(r) if r.status().is_success() => (true, true, None),
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                let detail: String = text.chars().take(300).collect();
                (
                    false,
                    worth_retrying(status),
                    Some(format!("webhook answered {status}: {detail}")),
                )
            }
            Err(e) => (false, true, Some(format!("webhook unreachable: {e}"))),
        };
        let recorded = db
            .call(
                "notification_delivered(id => $1, ok => $2, error => $3, retry => $4)",
                &[&id, &ok, &error, &retry],
            )
            .await?;
        if let Some(e) = &error {
            if recorded["given_up"] == true {
                warn!(notification = id, error = %e, attempts = %recorded["delivery_attempts"], "notification given up");
            } else {
                warn!(notification = id, error = %e, "notification not delivered; it will be retried");
            }
        }
    }
    Ok(())
}

/// A failed delivery is tried again unless the webhook refused the message itself: a 4xx
/// other than 408 (timeout) and 429 (rate limit) will be refused again (SPEC §13).
pub fn worth_retrying(status: StatusCode) -> bool {
    !status.is_client_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// The message as posted: `[level] message`, cut to CONTENT_LIMIT characters with a marker
/// saying how much was left out.
pub fn content(level: &str, message: &str) -> String {
    let full = format!("[{level}] {message}");
    let total = full.chars().count();
    if total <= CONTENT_LIMIT {
        return full;
    }
    // The marker's length depends on the number it names; 40 characters leave room for any.
    let kept = CONTENT_LIMIT - 40;
    let marker = format!(" … [cut: {} more characters]", total - kept);
    let mut cut: String = full.chars().take(kept).collect();
    cut.push_str(&marker);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_content_is_cut_to_the_limit_with_a_marker() {
        let message = "x".repeat(2545);
        let posted = content("info", &message);
        assert!(
            posted.chars().count() <= CONTENT_LIMIT,
            "{}",
            posted.chars().count()
        );
        assert!(posted.starts_with("[info] xxx"));
        assert!(posted.ends_with("more characters]"), "{posted}");
        let short = content("done", "all good");
        assert_eq!(short, "[done] all good");
        // Multi-byte characters are counted as characters, never split.
        let emoji = content("info", &"🚀".repeat(3000));
        assert!(emoji.chars().count() <= CONTENT_LIMIT);
    }

    #[test]
    fn plain_client_errors_are_not_retried() {
        assert!(!worth_retrying(StatusCode::BAD_REQUEST));
        assert!(!worth_retrying(StatusCode::NOT_FOUND));
        assert!(worth_retrying(StatusCode::REQUEST_TIMEOUT));
        assert!(worth_retrying(StatusCode::TOO_MANY_REQUESTS));
        assert!(worth_retrying(StatusCode::BAD_GATEWAY));
    }
}
