//! Notifications to a Discord-compatible webhook (SPEC §6), retried with back-off by the
//! extension; marked delivered only on success.

use anyhow::Result;
use serde_json::json;
use tracing::warn;

use crate::db::Db;

pub async fn deliver(db: &Db, http: &reqwest::Client, webhook: Option<&str>) -> Result<()> {
    let Some(webhook) = webhook else {
        return Ok(());
    };
    let batch = db.call("take_notifications(\"limit\" => 20)", &[]).await?;
    for n in batch.as_array().into_iter().flatten() {
        let id = n["id"].as_i64().unwrap_or_default();
        let body = json!({
            "content": format!("[{}] {}", n["level"].as_str().unwrap_or("info"), n["message"].as_str().unwrap_or_default()),
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
        let (ok, error): (bool, Option<String>) = match outcome {
            Ok(r) if r.status().is_success() => (true, None),
            Ok(r) => (false, Some(format!("webhook answered {}", r.status()))),
            Err(e) => (false, Some(format!("webhook unreachable: {e}"))),
        };
        if let Some(e) = &error {
            warn!(notification = id, error = %e, "notification not delivered; it will be retried");
        }
        db.call(
            "notification_delivered(id => $1, ok => $2, error => $3)",
            &[&id, &ok, &error],
        )
        .await?;
    }
    Ok(())
}
