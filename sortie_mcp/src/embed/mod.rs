//! Embedders for notes (SPEC §8), behind one interface: an OpenAI-compatible `/v1/embeddings`
//! client when one is configured, and a built-in offline embedder otherwise — or whenever the
//! service fails, so that writing and searching notes never fails because of it. The offline
//! embedder is all-MiniLM-L6-v2 when scripts/setup installed its weights, else the lexical
//! hashing embedder.

mod background;
mod hashing;
mod http;
mod minilm;

use std::sync::{Arc, OnceLock};

use tracing::warn;

use crate::config::{Config, Env};
pub use background::BackgroundEmbedder;
pub use hashing::HashingEmbedder;
pub use http::HttpEmbedder;
pub use minilm::MiniLm;

/// Vectors and the name of the model that made them; vectors of different models are never
/// compared with each other.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub model: String,
    /// True when the configured service failed and the offline embedder answered instead.
    pub degraded: bool,
}

pub struct Embedder {
    service: Option<HttpEmbedder>,
    offline: Offline,
}

enum Offline {
    /// all-MiniLM-L6-v2, whose weights are installed; loaded on first use, so that starting
    /// the MCP server stays instant.
    MiniLm,
    Hashing(HashingEmbedder),
}

/// The MiniLM model, loaded once per process (about 90 MB of weights).
fn shared_minilm() -> Option<Arc<MiniLm>> {
    static MODEL: OnceLock<Option<Arc<MiniLm>>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = minilm::find_model_dir(Env::get())?;
            match MiniLm::load(&dir) {
                Ok(model) => Some(Arc::new(model)),
                Err(e) => {
                    warn!(error = %e, dir = %dir.display(), "could not load the offline MiniLM model; using the hashing embedder");
                    None
                }
            }
        })
        .clone()
}

impl Embedder {
    pub fn from_config(config: &Config, http: reqwest::Client) -> Embedder {
        let service = match (&config.litellm_url, &config.embedding_model) {
            (Some(url), Some(model)) => Some(HttpEmbedder::new(
                http,
                url,
                config.litellm_key.clone(),
                model,
                config.embedding_dim,
            )),
            _ => None,
        };
        // MiniLM's vectors have 384 dimensions; another configured dimension keeps hashing.
        let installed = || minilm::find_model_dir(Env::get()).is_some();
        let offline = if config.embedding_dim == 384 && installed() {
            Offline::MiniLm
        } else {
            Offline::Hashing(HashingEmbedder::new(config.embedding_dim as usize))
        };
        Embedder { service, offline }
    }

    pub async fn embed(&self, texts: &[String]) -> Embedded {
        if let Some(service) = &self.service {
            match service.embed(texts).await {
                Ok(vectors) => {
                    return Embedded {
                        vectors,
                        model: service.model().to_string(),
                        degraded: false,
                    }
                }
                Err(e) => warn!(error = %e, "embedding service failed; using the offline embedder"),
            }
        }
        let degraded = self.service.is_some();
        let hashing = match &self.offline {
            Offline::Hashing(hashing) => {
                return Embedded {
                    vectors: texts.iter().map(|t| hashing.embed(t)).collect(),
                    model: hashing.model().into(),
                    degraded,
                };
            }
            Offline::MiniLm => {
                let batch = texts.to_vec();
                match tokio::task::spawn_blocking(move || {
                    shared_minilm().map(|model| model.embed(&batch))
                })
                .await
                {
                    Ok(Some(Ok(vectors))) => {
                        return Embedded {
                            vectors,
                            model: minilm::MODEL_NAME.into(),
                            degraded,
                        }
                    }
                    Ok(Some(Err(e))) => {
                        warn!(error = %e, "the MiniLM embedder failed; using the hashing embedder")
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, "the MiniLM embedder panicked; using the hashing embedder")
                    }
                }
                HashingEmbedder::new(384)
            }
        };
        Embedded {
            vectors: texts.iter().map(|t| hashing.embed(t)).collect(),
            model: hashing.model().into(),
            degraded: true,
        }
    }
}
