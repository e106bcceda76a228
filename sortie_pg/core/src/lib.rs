//! Sortie's pure rules: everything the engine decides without looking at the database.
//!
//! The extension (`sortie_pg`) wraps these functions as SQL functions; keeping them free of
//! PostgreSQL lets them be unit-tested in milliseconds.

pub mod error;
pub mod fingerprint;
pub mod metric;
pub mod plan;
pub mod preview;
pub mod steps;

pub use error::{code_for_sqlstate, RuleError, RuleResult, ERROR_CODES};

/// A readable campaign name from its goal: the first six words, lower case, hyphenated.
pub fn name_from_goal(goal: &str) -> String {
    let words: Vec<String> = goal
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(6)
        .map(str::to_lowercase)
        .collect();
    let name: String = words.join("-").chars().take(60).collect();
    if name.is_empty() {
        "campaign".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_come_from_the_first_words_of_the_goal() {
        assert_eq!(
            super::name_from_goal("Find the 3 best papers on RAG, then summarise"),
            "find-the-3-best-papers-on"
        );
        assert_eq!(super::name_from_goal("!!!"), "campaign");
    }
}
