//! Sortie's DAG engine as a PostgreSQL extension.
//!
//! The rules that are naturally SQL (state transitions, the claim path, the skip cascade) live
//! in `sql/` as PL/pgSQL, whose plans PostgreSQL caches; the rules that are pure computation
//! (step-JSON validation and expansion, fingerprints, previews, metrics, plan checks) live in
//! the `sortie_core` crate and are exposed here as immutable SQL functions.

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod pure;

extension_sql_file!("../../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// The rule families, one file each (docs/architecture.md names them). PL/pgSQL bodies are not
// resolved until called, but LANGUAGE sql ones are checked when created: each file comes after
// those it needs, and the first after every pure function.
extension_sql_file!(
    "../../sql/engine/events.sql",
    name = "events",
    requires = [
        pure::expand_steps,
        pure::parse_plan,
        pure::step_fingerprint,
        pure::preview,
        pure::read_range,
        pure::parse_metric,
        pure::metric_met,
        pure::name_from_goal,
        pure::wait_cycle_step
    ]
);
extension_sql_file!(
    "../../sql/engine/locking.sql",
    name = "locking",
    requires = ["events"]
);
extension_sql_file!(
    "../../sql/engine/counters.sql",
    name = "counters",
    requires = ["locking"]
);
extension_sql_file!(
    "../../sql/engine/lock_keys.sql",
    name = "lock_keys",
    requires = ["counters"]
);
extension_sql_file!(
    "../../sql/engine/readiness.sql",
    name = "readiness",
    requires = ["lock_keys"]
);
extension_sql_file!(
    "../../sql/engine/skip_cascade.sql",
    name = "skip_cascade",
    requires = ["readiness"]
);
extension_sql_file!(
    "../../sql/engine/compound.sql",
    name = "compound",
    requires = ["skip_cascade"]
);
extension_sql_file!(
    "../../sql/engine/campaign_end.sql",
    name = "campaign_end",
    requires = ["compound"]
);
extension_sql_file!(
    "../../sql/engine/completion.sql",
    name = "completion",
    requires = ["campaign_end"]
);
extension_sql_file!(
    "../../sql/engine/failure_retry.sql",
    name = "failure_retry",
    requires = ["completion"]
);
// What a worker may see (SPEC §15); used by claim, context and notes.
extension_sql_file!(
    "../../sql/engine/scope.sql",
    name = "scope",
    requires = ["failure_retry"]
);
extension_sql_file!(
    "../../sql/engine/claim.sql",
    name = "claim",
    requires = ["scope"]
);
extension_sql_file!(
    "../../sql/engine/leases.sql",
    name = "leases",
    requires = ["claim"]
);
extension_sql_file!(
    "../../sql/engine/budget.sql",
    name = "budget",
    requires = ["leases"]
);
extension_sql_file!(
    "../../sql/engine/input.sql",
    name = "input",
    requires = ["budget"]
);
extension_sql_file!(
    "../../sql/engine/add_steps.sql",
    name = "add_steps",
    requires = ["input"]
);
extension_sql_file!(
    "../../sql/engine/splice.sql",
    name = "splice",
    requires = ["add_steps"]
);
extension_sql_file!(
    "../../sql/engine/abort.sql",
    name = "abort",
    requires = ["splice"]
);
extension_sql_file!(
    "../../sql/engine/campaigns.sql",
    name = "campaigns",
    requires = ["abort"]
);
extension_sql_file!(
    "../../sql/engine/success.sql",
    name = "success",
    requires = ["campaigns"]
);
extension_sql_file!(
    "../../sql/engine/planning.sql",
    name = "planning",
    requires = ["success"]
);
extension_sql_file!(
    "../../sql/engine/context.sql",
    name = "context",
    requires = ["planning"]
);
extension_sql_file!(
    "../../sql/engine/notes.sql",
    name = "notes",
    requires = ["context"]
);
extension_sql_file!(
    "../../sql/engine/note_words.sql",
    name = "note_words",
    requires = ["notes"]
);
extension_sql_file!(
    "../../sql/engine/updates.sql",
    name = "updates",
    requires = ["note_words"]
);
extension_sql_file!(
    "../../sql/engine/notifications.sql",
    name = "notifications",
    requires = ["updates"]
);
extension_sql_file!(
    "../../sql/engine/workflows.sql",
    name = "workflows",
    requires = ["notifications"]
);
extension_sql_file!(
    "../../sql/engine/idempotency.sql",
    name = "idempotency",
    requires = ["workflows"]
);
extension_sql_file!(
    "../../sql/engine/observe.sql",
    name = "observe",
    requires = ["idempotency"]
);
extension_sql_file!(
    "../../sql/engine/retention.sql",
    name = "retention",
    requires = ["observe"]
);
// After every file that creates a table: marks them all for pg_dump.
extension_sql_file!(
    "../../sql/engine/backup.sql",
    name = "backup",
    requires = ["retention"]
);
extension_sql_file!(
    "../../sql/engine/invariants.sql",
    name = "invariants",
    requires = ["backup"]
);
// Scale-out on Citus (SPEC §2, docs/scale-out.md): sortie.distribute(), called by an operator.
extension_sql_file!(
    "../../sql/engine/distribute.sql",
    name = "distribute",
    requires = ["invariants"]
);
// Last of all (SPEC §15): roles and grants over every function created before it.
extension_sql_file!("../../sql/engine/roles.sql", name = "roles", finalize);

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test(
        error = "value for domain sortie.step_status violates check constraint \"step_status_check\""
    )]
    fn the_schema_refuses_a_bogus_status() {
        let campaign = Spi::get_one::<pgrx::Uuid>(
            "SELECT (sortie.create_campaign(goal => 'g') ->> 'id')::uuid",
        )
        .expect("spi")
        .expect("campaign id");
        Spi::run(&format!("INSERT INTO sortie.steps (campaign_id, action, status) VALUES ('{campaign}', 'a', 'bogus')"))
            .expect("the insert raises before returning");
    }

    #[pg_test]
    fn expand_steps_reports_errors_as_data() {
        let answer = Spi::get_one::<pgrx::JsonB>(
            "SELECT sortie._expand_steps('[{\"step_type\": \"loop\", \"action\": \"a\"}]')",
        )
        .expect("spi")
        .expect("a result");
        assert_eq!(answer.0["error"]["code"], "invalid_argument");
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
