//! A Citus cluster for the scale-out tests (SPEC §2, issue 19): a coordinator and two workers,
//! three PostgreSQL clusters on this machine with `shared_preload_libraries = 'citus'`, each
//! listening on its own free TCP port on 127.0.0.1 (Citus nodes reach each other over TCP;
//! `initdb --auth=trust` trusts local connections). Started once per test process, like
//! `TestDb`'s cluster, and stopped and removed by a watchdog when the process is gone.
//!
//! Each test gets its own database, made on all three nodes (about a second): Citus keeps its
//! node list per database, so `citus` is created in the new database on every node and the
//! coordinator registers itself and the two workers there. Nothing is shared between tests.
//!
//! Citus itself comes from `scripts/setup` (built from the shared source once).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use sortie_mcp::embedded::{find_bin_dir, running_as_root, Cluster};
use tokio_postgres::{Client, NoTls};

/// One node of the cluster: a PostgreSQL cluster and the TCP port it listens on.
pub struct Node {
    pub cluster: Cluster,
    pub port: u16,
}

impl Node {
    /// A connection string over TCP, the way the other nodes reach this one.
    pub fn connection_string(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    pub async fn connect(&self, database: &str) -> anyhow::Result<Client> {
        connect(&self.connection_string(database)).await
    }
}

/// The coordinator and its two workers.
pub struct CitusCluster {
    pub coordinator: Node,
    pub workers: [Node; 2],
}

static CLUSTER: OnceLock<CitusCluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// Server settings of every node: the test settings (durability off) with less shared memory,
/// since three servers share the machine. Eight shards (four per worker) spread campaigns over
/// both workers while keeping a test's `create_distributed_table` calls quick; Citus's default
/// is 32.
const CITUS_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "128MB"),
    ("log_min_messages", "warning"),
    ("shared_preload_libraries", "citus"),
    ("citus.shard_count", "8"),
    // Citus asks for SSL between nodes by default and turns SSL on in a node when its
    // extension is created; a node that has not reloaded yet refuses the coordinator's
    // citus_add_node ("server does not support SSL"). These nodes share one machine.
    ("citus.node_conninfo", "sslmode=prefer"),
    ("listen_addresses", "127.0.0.1"),
];

/// This test process's Citus cluster, started on first use.
pub fn cluster() -> &'static CitusCluster {
    // Started on a thread of its own: tests call this from inside their tokio runtime.
    CLUSTER.get_or_init(|| {
        std::thread::spawn(CitusCluster::start)
            .join()
            .expect("Citus cluster thread")
            .unwrap_or_else(|e| panic!("Citus test cluster: {e:#}"))
    })
}

impl CitusCluster {
    /// Starts three servers in a new temporary directory. A port taken between choosing it and
    /// the server binding it fails the start; the servers are then started again on new ports.
    fn start() -> anyhow::Result<CitusCluster> {
        let bin_dir = find_bin_dir()?;
        check_citus_installed(&bin_dir)?;
        let base = std::env::var_os("SORTIE_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let root = base.join(format!(
            "sortie-citus-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&root)?;
        let node_dirs = ["coordinator", "worker1", "worker2"].map(|name| root.join(name));
        spawn_watchdog(&root, &bin_dir, &node_dirs)?;

        // initdb and start take a few seconds each: the three run side by side.
        let nodes = std::thread::scope(|scope| {
            let starts: Vec<_> = node_dirs
                .iter()
                .map(|dir| scope.spawn(|| start_node(dir, &bin_dir)))
                .collect();
            starts
                .into_iter()
                .map(|start| start.join().expect("node start thread"))
                .collect::<anyhow::Result<Vec<Node>>>()
        })?;
        let [coordinator, worker1, worker2]: [Node; 3] = nodes
            .try_into()
            .map_err(|_| anyhow::anyhow!("three nodes"))?;
        Ok(CitusCluster {
            coordinator,
            workers: [worker1, worker2],
        })
    }

    /// The coordinator, then the workers.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.coordinator).chain(self.workers.iter())
    }

    /// A new database on all three nodes with `citus` created on each, the coordinator
    /// registered (`citus_set_coordinator_host`) and both workers added (`citus_add_node`).
    pub async fn create_database(&'static self) -> anyhow::Result<CitusDb> {
        let name = format!(
            "c_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let made = self.nodes().map(|node| {
            let name = name.clone();
            async move {
                let admin = node.connect("postgres").await?;
                // The coordinator says in a NOTICE that it does not propagate CREATE
                // DATABASE; every node gets its own, here.
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await?;
                node.connect(&name)
                    .await?
                    .batch_execute("CREATE EXTENSION citus")
                    .await
                    .context("CREATE EXTENSION citus")?;
                anyhow::Ok(())
            }
        });
        futures_util::future::try_join_all(made).await?;
        let client = self.coordinator.connect(&name).await?;
        client
            .execute(
                "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
                &[&i32::from(self.coordinator.port)],
            )
            .await
            .context("citus_set_coordinator_host")?;
        for worker in &self.workers {
            // Under a loaded machine the coordinator's first connection to a worker's new
            // database was refused once ("failure on connection marked as essential"); a node
            // that was not added is added again, up to three times.
            let mut attempt = 0;
            loop {
                attempt += 1;
                match client
                    .execute(
                        "SELECT citus_add_node('127.0.0.1', $1)",
                        &[&i32::from(worker.port)],
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(e) if attempt < 3 => {
                        eprintln!(
                            "citus_add_node for port {} (attempt {attempt}): {e}",
                            worker.port
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(500 * attempt)).await;
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("citus_add_node for port {}", worker.port))
                    }
                }
            }
        }
        Ok(CitusDb {
            name,
            cluster: self,
            client,
        })
    }
}

/// One test's database on the Citus cluster; `client` is connected to the coordinator.
pub struct CitusDb {
    pub name: String,
    pub cluster: &'static CitusCluster,
    pub client: Client,
}

impl CitusDb {
    /// A fresh database on this process's cluster (started on first use).
    pub async fn new() -> CitusDb {
        cluster()
            .create_database()
            .await
            .unwrap_or_else(|e| panic!("Citus test database: {e:#}"))
    }

    /// The coordinator's connection string for this database (what DATABASE_URL gets).
    pub fn connection_string(&self) -> String {
        self.cluster.coordinator.connection_string(&self.name)
    }

    /// Worker `index`'s (0 or 1) connection string for this database.
    pub fn worker_connection_string(&self, index: usize) -> String {
        self.cluster.workers[index].connection_string(&self.name)
    }

    /// Another connection to the coordinator.
    pub async fn connect(&self) -> Client {
        connect(&self.connection_string())
            .await
            .expect("coordinator connection")
    }

    /// A connection straight to worker `index` (0 or 1), to look at its shards and statistics.
    pub async fn connect_worker(&self, index: usize) -> Client {
        connect(&self.worker_connection_string(index))
            .await
            .expect("worker connection")
    }
}

async fn connect(connection_string: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(connection_string, NoTls)
        .await
        .with_context(|| format!("connecting to {connection_string}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One node in `dir`, on a free port; tried three times, each on a new port.
fn start_node(dir: &std::path::Path, bin_dir: &std::path::Path) -> anyhow::Result<Node> {
    let mut last_error = None;
    for _ in 0..3 {
        let mut cluster = Cluster::new(dir.to_path_buf(), bin_dir.to_path_buf());
        let port = free_port()?;
        cluster.settings = CITUS_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("port".to_string(), port.to_string())])
            .collect();
        match cluster.ensure_running() {
            Ok(()) => return Ok(Node { cluster, port }),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .expect("three attempts")
        .context(format!("starting the Citus node in {}", dir.display())))
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The servers load citus.so at start; without it they fail with a message about the library
/// that does not say where Citus comes from.
fn check_citus_installed(bin_dir: &std::path::Path) -> anyhow::Result<()> {
    let output = Command::new(bin_dir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .context("running pg_config --pkglibdir")?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !libdir.join("citus.so").is_file() {
        bail!(
            "Citus is not installed ({} has no citus.so): run scripts/setup --citus",
            libdir.display()
        );
    }
    Ok(())
}

/// Stops the three servers and removes their directory once this process is gone, also when
/// a test panics or the binary is killed (as the harness does for `TestDb`'s cluster).
fn spawn_watchdog(
    root: &std::path::Path,
    bin_dir: &std::path::Path,
    node_dirs: &[PathBuf],
) -> anyhow::Result<()> {
    let pg_ctl = bin_dir.join("pg_ctl");
    let as_server_user = if running_as_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let stops: String = node_dirs
        .iter()
        .map(|dir| {
            format!(
                "{as_server_user}{} stop -m immediate -D {} >/dev/null 2>&1; ",
                pg_ctl.display(),
                Cluster::new(dir.clone(), bin_dir.to_path_buf())
                    .data_dir()
                    .display()
            )
        })
        .collect();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stops}rm -rf {root}",
        pid = std::process::id(),
        root = root.display()
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
