//! Embedding off the request path (SPEC §18). add_note stores the note at once and answers
//! with the notes sharing its words; the note is queued here and embedded a few milliseconds
//! later, in batches, through `set_note_embedding`. A search in the same server first waits
//! for the queue to settle, so what a session wrote is searchable by meaning when it searches.
//! Notes left unembedded (the server stopped first, the database was away) are the runner's
//! backfill's (`notes_to_embed`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::warn;

use super::Embedder;
use crate::db::Db;

/// Notes embedded together at most: one model call for a burst of notes.
const BATCH: usize = 32;

pub struct BackgroundEmbedder {
    embedder: Arc<Embedder>,
    queue: OnceLock<mpsc::UnboundedSender<(Db, i64, String)>>,
    pending: Arc<Pending>,
}

#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    settled: Notify,
}

impl BackgroundEmbedder {
    pub fn new(embedder: Arc<Embedder>) -> BackgroundEmbedder {
        BackgroundEmbedder {
            embedder,
            queue: OnceLock::new(),
            pending: Arc::default(),
        }
    }

    /// Queues a stored note for its embedding. The worker task starts with the first note
    /// (inside the server's runtime).
    pub fn queue(&self, db: &Db, note_id: i64, content: String) {
        let sender = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(work(receiver, self.embedder.clone(), self.pending.clone()));
            sender
        });
        self.pending.count.fetch_add(1, Ordering::SeqCst);
        if sender.send((db.clone(), note_id, content)).is_err() {
            self.pending.done(1);
        }
    }

    /// Waits until every queued note is embedded (or given up), at most `limit`.
    pub async fn settled(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let notified = self.pending.settled.notified();
                if self.pending.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

impl Pending {
    fn done(&self, n: usize) {
        if self.count.fetch_sub(n, Ordering::SeqCst) == n {
            self.settled.notify_waiters();
        }
    }
}

async fn work(
    mut receiver: mpsc::UnboundedReceiver<(Db, i64, String)>,
    embedder: Arc<Embedder>,
    pending: Arc<Pending>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let texts: Vec<String> = batch.iter().map(|(_, _, text)| text.clone()).collect();
        let embedded = embedder.embed(&texts).await;
        for ((db, note_id, _), vector) in batch.iter().zip(embedded.vectors) {
            let vector = pgvector::Vector::from(vector);
            if let Err(e) = db
                .call(
                    "set_note_embedding(note_id => $1, embedding => $2, embedding_model => $3)",
                    &[note_id, &vector, &embedded.model],
                )
                .await
            {
                warn!(note = note_id, error = %e, "could not store a note's embedding; the runner's backfill will");
            }
        }
        pending.done(batch.len());
        batch.clear();
    }
}
