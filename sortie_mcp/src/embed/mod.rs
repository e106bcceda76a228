//! Embedders for notes (SPEC §8), behind one interface: an OpenAI-compatible `/v1/embeddings`
//! client when one is configured, and the built-in offline embedder otherwise — or whenever
//! the service fails, so that writing and searching notes never fails because of it.

mod hashing;
mod http;

use tracing::warn;

use crate::config::Config;
pub use hashing::HashingEmbedder;
pub use http::HttpEmbedder;

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
    offline: HashingEmbedder,
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
        Embedder {
            service,
            offline: HashingEmbedder::new(config.embedding_dim as usize),
        }
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
        Embedded {
            vectors: texts.iter().map(|t| self.offline.embed(t)).collect(),
            model: self.offline.model().to_string(),
            degraded: self.service.is_some(),
        }
    }
}
