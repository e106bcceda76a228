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
extension_sql_file!(
    "../../sql/engine/core.sql",
    name = "core",
    requires = [pure::expand_steps]
);
// What a worker may see (SPEC §15); used by context, notes and claim.
extension_sql_file!(
    "../../sql/engine/scope.sql",
    name = "scope",
    requires = ["core"]
);
extension_sql_file!(
    "../../sql/engine/campaigns.sql",
    name = "campaigns",
    requires = ["core"]
);
extension_sql_file!(
    "../../sql/engine/add_steps.sql",
    name = "add_steps",
    requires = ["core"]
);
extension_sql_file!(
    "../../sql/engine/claim.sql",
    name = "claim",
    requires = ["core", "scope"]
);
extension_sql_file!(
    "../../sql/engine/worker.sql",
    name = "worker",
    requires = ["add_steps"]
);
extension_sql_file!(
    "../../sql/engine/context.sql",
    name = "context",
    requires = ["core", "scope", "worker", pure::preview]
);
extension_sql_file!(
    "../../sql/engine/notes.sql",
    name = "notes",
    requires = ["core", "scope"]
);
extension_sql_file!(
    "../../sql/engine/updates.sql",
    name = "updates",
    requires = ["core"]
);
extension_sql_file!(
    "../../sql/engine/notifications.sql",
    name = "notifications",
    requires = ["claim"]
);
extension_sql_file!(
    "../../sql/engine/workflows.sql",
    name = "workflows",
    requires = ["core"]
);
extension_sql_file!(
    "../../sql/engine/idempotency.sql",
    name = "idempotency",
    requires = ["core"]
);
extension_sql_file!(
    "../../sql/engine/observe.sql",
    name = "observe",
    requires = ["core", "updates", "campaigns"]
);
extension_sql_file!(
    "../../sql/engine/note_words.sql",
    name = "note_words",
    requires = ["notes"]
);
extension_sql_file!(
    "../../sql/engine/batches.sql",
    name = "batches",
    requires = ["worker", "claim"]
);
extension_sql_file!(
    "../../sql/engine/retention.sql",
    name = "retention",
    requires = ["core"]
);
// After every file that creates a table: marks them all for pg_dump.
extension_sql_file!(
    "../../sql/engine/backup.sql",
    name = "backup",
    requires = ["idempotency", "workflows", "notes", "retention"]
);
extension_sql_file!(
    "../../sql/engine/invariants.sql",
    name = "invariants",
    requires = ["core"]
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
            "SELECT sortie.expand_steps('[{\"step_type\": \"loop\", \"action\": \"a\"}]')",
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
