//! The throwaway PostgreSQL cluster of a test binary (temporary directory, its own Unix socket,
//! no TCP port), started on first use with a template database holding the real extension, and
//! stopped and removed by a watchdog process when the binary exits — also when a test panics or
//! the binary is killed. `sortie-bench` starts its own with other settings.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use sortie_mcp::embedded::{find_bin_dir, running_as_root, Cluster};
use tokio_postgres::{Client, NoTls};

const TEMPLATE: &str = "sortie_template";

/// The test binary's cluster, started by the first test that needs it.
pub(crate) struct Shared {
    pub(crate) cluster: Cluster,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// Tests trade durability for speed; benchmarks choose their own settings.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "256MB"),
    ("log_min_messages", "warning"),
];

/// This test binary's cluster, started on first use.
pub(crate) fn shared() -> &'static Shared {
    // Started on a thread of its own: tests call this from inside their tokio runtime.
    SHARED.get_or_init(|| {
        std::thread::spawn(|| start_cluster(TEST_SETTINGS))
            .join()
            .expect("cluster thread")
            .map(|cluster| Shared { cluster })
            .unwrap_or_else(|e| panic!("test cluster: {e:#}"))
    })
}

/// A throwaway cluster with a template database holding the extension; stopped and removed
/// when this process exits.
pub fn start_cluster(settings: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    // Not under /root or a private TMPDIR: the server user must reach it when we are root.
    let base = std::env::var_os("SORTIE_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let root = base.join(format!(
        "sortie-test-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&root)?;
    let mut cluster = Cluster::new(root.clone(), find_bin_dir()?);
    cluster.settings = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    cluster.ensure_running()?;
    spawn_watchdog(&cluster)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = connect_to(&cluster, "postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
            .await?;
        let template = connect_to(&cluster, TEMPLATE).await?;
        template
            .batch_execute("CREATE EXTENSION sortie CASCADE")
            .await?;
        anyhow::Ok(())
    })?;
    Ok(cluster)
}

/// A new database with the extension, cloned from the template; returns its name.
pub async fn create_database(cluster: &Cluster) -> anyhow::Result<String> {
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let admin = connect_to(cluster, "postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
        .await?;
    Ok(name)
}

/// Stops the cluster and removes its directory once this process is gone.
fn spawn_watchdog(cluster: &Cluster) -> anyhow::Result<()> {
    let pg_ctl = cluster.bin_dir.join("pg_ctl");
    let stop = if running_as_root() {
        format!(
            "runuser -u postgres -- {} stop -m immediate -D {}",
            pg_ctl.display(),
            cluster.data_dir().display()
        )
    } else {
        format!(
            "{} stop -m immediate -D {}",
            pg_ctl.display(),
            cluster.data_dir().display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {root}",
        pid = std::process::id(),
        root = cluster.root.display()
    );
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    Ok(())
}

pub async fn connect_to(cluster: &Cluster, database: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(&cluster.connection_string(database), NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A new, empty database of the test cluster without the extension (start-up checks);
/// returns its connection string.
pub async fn database_without_extension() -> String {
    let cluster = &shared().cluster;
    let name = format!(
        "plain_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let admin = connect_to(cluster, "postgres")
        .await
        .expect("admin connection");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a database without the extension");
    cluster.connection_string(&name)
}
