//! Fenced code blocks of a Markdown file, for tests that run the documentation's examples.

/// One fenced block: its info string (`sql`, `sh no-run`, ...), its text and the line of
/// its opening fence (1-based), for messages.
#[derive(Debug, Clone)]
pub struct Block {
    pub info: String,
    pub text: String,
    pub line: usize,
}

impl Block {
    /// The block's language: the first word of its info string.
    pub fn language(&self) -> &str {
        self.info.split_whitespace().next().unwrap_or("")
    }

    /// Whether the info string carries `word` after the language (`no-run`, `refused`).
    pub fn has(&self, word: &str) -> bool {
        self.info.split_whitespace().skip(1).any(|w| w == word)
    }
}

/// Every block fenced with three backticks, in order. A fence may be indented (a block
/// inside a list item); that indentation is removed from the block's lines.
pub fn code_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                let block = Block {
                    info: info.trim().to_string(),
                    text: String::new(),
                    line: i + 1,
                };
                open = Some((block, indent));
            }
            (Some(_), Some(rest)) if rest.trim().is_empty() => {
                blocks.extend(open.take().map(|(block, _)| block));
            }
            (Some((block, fence_indent)), _) => {
                let cut = indent.min(*fence_indent);
                block.text.push_str(&line[cut..]);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "a code block is never closed");
    blocks
}

/// A file of the repository, by its path from the repository's root.
pub fn read(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}
