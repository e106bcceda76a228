//! LISTEN on `sortie_events`: the first change after a quiet interval wakes the runner at once
//! (later ones within the extension's `wake_interval()` are left to the runner's polling).
//! NOTIFY is only a hint — the tick polls anyway — so a lost connection is re-established
//! quietly.
//!
//! On a Citus cluster the rules delegated to a worker (completions, failures, …) send their
//! wake-up from that worker, whose listeners alone hear it: the listener then also listens on
//! every active primary worker of `pg_dist_node`, with the same user, password and database
//! (docs/scale-out.md). A worker that cannot be reached or refuses the connection is logged and
//! left out; the coordinator and the other workers are still heard, and the polling covers the
//! rest. The list is read again every minute; a change, a worker left out, or a connection
//! closing reconnects them all.

use std::time::Duration;

use futures_util::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};
use tracing::{debug, warn};

/// How often the listener reads the Citus worker list again.
const NODES_RECHECK: Duration = Duration::from_secs(60);

/// A receiver that yields once per batch of events.
pub async fn listen(connection_string: &str) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let connection_string = connection_string.to_string();
    tokio::spawn(async move {
        loop {
            if let Err(e) = listen_once(&connection_string, &tx).await {
                debug!(error = %e, "event listener disconnected; reconnecting");
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    rx
}

/// What a connection's driver reports.
enum Heard {
    Notification,
    Closed,
}

async fn listen_once(connection_string: &str, tx: &mpsc::Sender<()>) -> anyhow::Result<()> {
    let config: Config = connection_string.parse()?;
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let mut drivers = Vec::new();
    let result = async {
        let (client, workers) = {
            let client = connect(&config, &heard_tx, &mut drivers).await?;
            let workers = citus_workers(&client).await?;
            // LISTEN last: an operator's pg_stat_activity shows the connection's last query.
            client.batch_execute("LISTEN sortie_events").await?;
            (client, workers)
        };
        // Kept open: dropping a client closes its connection.
        let mut worker_clients = Vec::with_capacity(workers.len());
        let mut left_out = false;
        for (host, port) in &workers {
            let node = on_node(&config, host, *port);
            match listen_on(&node, &heard_tx, &mut drivers).await {
                Ok(client) => worker_clients.push(client),
                Err(e) => {
                    left_out = true;
                    warn!(host = %host, port, error = %e,
                          "cannot listen for wake-ups on this Citus worker; its changes are found by polling");
                }
            }
        }
        if !workers.is_empty() {
            debug!(
                workers = workers.len(),
                "listening on the Citus workers too"
            );
        }
        let mut recheck = tokio::time::interval(NODES_RECHECK);
        recheck.tick().await;
        loop {
            tokio::select! {
                message = heard.recv() => match message {
                    // A full channel means a wake-up is already pending.
                    Some(Heard::Notification) => { let _ = tx.try_send(()); }
                    Some(Heard::Closed) | None => anyhow::bail!("a listening connection closed"),
                },
                // Nobody listens any more (a web page closed, say): close the connections too.
                _ = tx.closed() => return Ok(()),
                _ = recheck.tick() => {
                    if citus_workers(&client).await? != workers {
                        anyhow::bail!("the Citus worker list changed");
                    }
                    if left_out {
                        anyhow::bail!("trying the Citus workers left out again");
                    }
                    // Already listening; said again so that the last query shown is LISTEN.
                    client.batch_execute("LISTEN sortie_events").await?;
                }
            }
        }
    }
    .await;
    for driver in drivers {
        driver.abort();
    }
    result
}

/// Connects with `config` and runs LISTEN (see `connect`).
async fn listen_on(
    config: &Config,
    heard: &mpsc::UnboundedSender<Heard>,
    drivers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Client> {
    let client = connect(config, heard, drivers).await?;
    client.batch_execute("LISTEN sortie_events").await?;
    Ok(client)
}

/// Connects with `config` and starts the connection's driver, which reports notifications and
/// the connection's end on `heard`.
async fn connect(
    config: &Config,
    heard: &mpsc::UnboundedSender<Heard>,
    drivers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Client> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let heard = heard.clone();
    drivers.push(tokio::spawn(async move {
        let mut stream = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = heard.send(Heard::Notification);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = heard.send(Heard::Closed);
    }));
    Ok(client)
}

/// The active primary workers of a Citus coordinator, as (host, port) in a stable order;
/// empty on a server without Citus.
async fn citus_workers(client: &Client) -> anyhow::Result<Vec<(String, u16)>> {
    let citus = client
        .query_one(
            "SELECT to_regclass('pg_catalog.pg_dist_node') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if !citus {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT nodename, nodeport FROM pg_catalog.pg_dist_node \
              WHERE isactive AND noderole = 'primary' AND groupid <> 0 \
              ORDER BY nodename, nodeport",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i32>(1) as u16))
        .collect())
}

/// `config` pointed at another node: the same user, password, database and options.
fn on_node(config: &Config, host: &str, port: u16) -> Config {
    let mut node = Config::new();
    node.host(host).port(port);
    if let Some(user) = config.get_user() {
        node.user(user);
    }
    if let Some(password) = config.get_password() {
        node.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        node.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        node.options(options);
    }
    if let Some(name) = config.get_application_name() {
        node.application_name(name);
    }
    // A worker that does not answer must not hold the other nodes' wake-ups up.
    node.connect_timeout(
        config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5)),
    );
    node
}
