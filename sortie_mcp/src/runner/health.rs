//! SPEC §16: the runner warns when `health()` finds a problem (an open transaction holding
//! back get_updates, expired leases nothing resets, bloat, undelivered notifications, stalled
//! campaigns), at most once per HEALTH_INTERVAL, so a daemon's log says why things are slow.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::db::Db;

const HEALTH_INTERVAL: Duration = Duration::from_secs(60);

/// When this process last asked; one runner per process, so a process-wide clock suffices.
static LAST_CHECK: Mutex<Option<Instant>> = Mutex::new(None);

fn due(now: Instant) -> bool {
    let mut last = LAST_CHECK.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|at| now.duration_since(at) < HEALTH_INTERVAL) {
        return false;
    }
    *last = Some(now);
    true
}

/// Never fails the tick: health is advice, and a database that cannot answer fails the
/// tick's own calls anyway.
pub(super) async fn warn_if_unhealthy(db: &Db) {
    if !due(Instant::now()) {
        return;
    }
    let health = match db.call("health()", &[]).await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "cannot read health()");
            return;
        }
    };
    for problem in health["problems"].as_array().into_iter().flatten() {
        warn!(
            problem = problem["code"].as_str().unwrap_or("unknown"),
            "{} (see `sortie doctor`)",
            problem["message"].as_str().unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_asked_at_most_once_per_interval() {
        let start = Instant::now();
        assert!(due(start));
        assert!(!due(start + Duration::from_secs(59)));
        assert!(due(start + Duration::from_secs(61)));
    }
}
