//! LISTEN on `sortie_events`: the first change after a quiet interval wakes the runner at once
//! (later ones within the extension's `wake_interval()` are left to the runner's polling).
//! NOTIFY is only a hint — the tick polls anyway — so a lost connection is re-established
//! quietly.

use std::time::Duration;

use futures_util::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::debug;

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

async fn listen_once(connection_string: &str, tx: &mpsc::Sender<()>) -> anyhow::Result<()> {
    let (client, mut connection) = tokio_postgres::connect(connection_string, NoTls).await?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = messages_tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute("LISTEN sortie_events").await?;
    loop {
        tokio::select! {
            message = messages.recv() => {
                if message.is_none() {
                    break;
                }
                // A full channel means a wake-up is already pending.
                let _ = tx.try_send(());
            }
            // Nobody listens any more (a web page closed, say): close the connection too.
            _ = tx.closed() => break,
        }
    }
    driver.abort();
    Ok(())
}
