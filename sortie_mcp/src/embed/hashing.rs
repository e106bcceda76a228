//! The built-in offline embedder: a lexical hashing embedder, named for what it is. Words are
//! lower-cased and lightly stemmed; each word and each character trigram is hashed into a
//! signed bucket of the vector, which is then L2-normalised. It captures shared vocabulary and
//! word forms, not meaning: notes phrased with different words meet only through the
//! full-text side of the hybrid search or a real embedding model.

use sha2::{Digest, Sha256};

pub struct HashingEmbedder {
    dim: usize,
}

impl HashingEmbedder {
    pub fn new(dim: usize) -> HashingEmbedder {
        HashingEmbedder { dim: dim.max(1) }
    }

    pub fn model(&self) -> &'static str {
        "sortie-hashing-v1"
    }

    pub fn embed(&self, text: &str) -> Vec<f32> {
        let mut vector = vec![0f32; self.dim];
        for word in words(text) {
            self.add(&mut vector, &format!("w:{word}"), 1.0);
            let padded: Vec<char> = format!("^{word}$").chars().collect();
            for gram in padded.windows(3) {
                self.add(
                    &mut vector,
                    &format!("g:{}", gram.iter().collect::<String>()),
                    0.35,
                );
            }
        }
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            vector.iter_mut().for_each(|x| *x /= norm);
        }
        vector
    }

    fn add(&self, vector: &mut [f32], feature: &str, weight: f32) {
        let digest = Sha256::digest(feature.as_bytes());
        let bucket =
            u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8])) as usize % self.dim;
        let sign = if digest[8] & 1 == 0 { 1.0 } else { -1.0 };
        vector[bucket] += sign * weight;
    }
}

const STOP_WORDS: &[&str] = &[
    "the", "a", "an", "and", "or", "of", "to", "in", "on", "for", "is", "are", "was", "were", "be",
    "it", "this", "that", "with", "as", "by", "at", "from", "we", "our", "its",
];

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .map(|w| stem(&w))
}

fn stem(word: &str) -> String {
    for suffix in [
        "ations", "ation", "ings", "ing", "edly", "ies", "ed", "es", "ly", "s",
    ] {
        if word.len() > suffix.len() + 3 {
            if let Some(root) = word.strip_suffix(suffix) {
                return root.to_string();
            }
        }
    }
    word.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_are_normalised_and_deterministic() {
        let e = HashingEmbedder::new(384);
        let v = e.embed("Migrating the payment service to Rust");
        assert_eq!(v.len(), 384);
        assert!((cosine(&v, &v) - 1.0).abs() < 1e-5);
        assert_eq!(v, e.embed("Migrating the payment service to Rust"));
    }

    #[test]
    fn shared_word_forms_are_closer_than_unrelated_text() {
        let e = HashingEmbedder::new(384);
        let note = e.embed("The migration of the billing module finished; tests pass");
        let near = e.embed("is the billing migration finished?");
        let far = e.embed("three papers on protein folding from 2021");
        assert!(cosine(&note, &near) > cosine(&note, &far) + 0.2);
    }

    #[test]
    fn empty_text_embeds_to_zero() {
        assert!(HashingEmbedder::new(8)
            .embed("  ... ")
            .iter()
            .all(|x| *x == 0.0));
    }
}
