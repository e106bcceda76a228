//! An OpenAI-compatible `/v1/embeddings` client (LiteLLM, Ollama, vLLM, OpenAI).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub struct HttpEmbedder {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
    model: String,
    dim: u32,
}

impl HttpEmbedder {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        key: Option<String>,
        model: &str,
        dim: u32,
    ) -> HttpEmbedder {
        HttpEmbedder {
            http,
            url: format!("{base}/v1/embeddings"),
            key,
            model: model.to_string(),
            dim,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut request = self
            .http
            .post(&self.url)
            .timeout(Duration::from_secs(10))
            .json(&json!({"model": self.model, "input": texts}));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .context("embedding service unreachable")?;
        if !response.status().is_success() {
            bail!("embedding service answered {}", response.status());
        }
        let answer: Value = response
            .json()
            .await
            .context("embedding answer is not JSON")?;
        let data = answer["data"]
            .as_array()
            .context("embedding answer has no data")?;
        if data.len() != texts.len() {
            bail!(
                "embedding service returned {} vectors for {} texts",
                data.len(),
                texts.len()
            );
        }
        let mut vectors = vec![Vec::new(); texts.len()];
        for (position, item) in data.iter().enumerate() {
            let index = item["index"]
                .as_u64()
                .map(|i| i as usize)
                .unwrap_or(position);
            let vector: Vec<f32> = item["embedding"]
                .as_array()
                .context("an embedding is missing")?
                .iter()
                .map(|x| x.as_f64().unwrap_or(0.0) as f32)
                .collect();
            if vector.len() != self.dim as usize {
                bail!(
                    "model {} returned {} dimensions, but notes store {} (SORTIE_EMBEDDING_DIM)",
                    self.model,
                    vector.len(),
                    self.dim
                );
            }
            *vectors
                .get_mut(index)
                .context("embedding index out of range")? = vector;
        }
        Ok(vectors)
    }
}
