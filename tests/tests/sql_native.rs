//! The rules tested in SQL (pgTAP): each file of tests/sql calls the extension's functions
//! directly, after the shared tests/sql/_setup.sql, in one transaction that is rolled back, on
//! a fresh database of the test cluster, and ends with check_invariants(). A file fails when
//! psql fails, when any TAP line is `not ok`, or when the plan's count is not met.

use std::path::{Path, PathBuf};

use sortie_tests::{psql, TestDb};

fn sql_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql")
}

/// Runs one file; panics with its TAP output when anything in it failed.
async fn run_file(name: &str) {
    let dir = sql_dir();
    let setup = std::fs::read_to_string(dir.join("_setup.sql")).expect("tests/sql/_setup.sql");
    let body = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let db = TestDb::new().await;
    let script = format!("\\set ON_ERROR_STOP 1\n\\pset tuples_only on\n\\pset format unaligned\nBEGIN;\n{setup}\n{body}\nROLLBACK;\n");
    let output = psql(&db.connection_string(), &script);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let report = || format!("{name}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(output.status.success(), "psql failed: {}", report());
    let planned: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("1..").and_then(|n| n.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no TAP plan: {}", report()));
    let passed = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("not ok")).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {}",
        failed.join("; "),
        report()
    );
    assert_eq!(
        passed,
        planned,
        "ran {passed} of {planned} planned: {}",
        report()
    );
    assert!(
        stdout.contains("check_invariants() finds nothing"),
        "every file ends with the invariants: {}",
        report()
    );
    db.finish().await;
}

macro_rules! sql_tests {
    ($($test:ident => $file:literal),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                run_file($file).await;
            }
        )*

        /// A file added to tests/sql without a test here would never run.
        #[test]
        fn every_sql_file_has_a_test() {
            let listed = [$($file),*];
            let mut on_disk: Vec<String> = std::fs::read_dir(sql_dir())
                .unwrap()
                .filter_map(Result::ok)
                .map(|e| e.file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".sql") && !n.starts_with('_'))
                .collect();
            on_disk.sort();
            let mut listed: Vec<&str> = listed.to_vec();
            listed.sort();
            assert_eq!(on_disk, listed);
            assert!(Path::new(&sql_dir().join("_setup.sql")).is_file());
        }
    };
}

sql_tests! {
    claims_leases_and_fencing => "claim.sql",
    completion_and_the_end_rule => "completion.sql",
    failure_retry_and_the_skip_cascade => "failure_retry.sql",
    compound_steps_and_for_each => "compound.sql",
    when_a_campaign_ends => "campaign_end.sql",
    splices_and_aborts => "splice_abort.sql",
    input_budgets_and_dedup => "input_budget_dedup.sql",
    notes_and_search => "notes_search.sql",
    notifications_and_updates => "notifications_updates.sql",
    command_checked_completion => "verification.sql",
}
