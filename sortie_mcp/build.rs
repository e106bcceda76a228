//! Puts the git commit the binaries are built from into `--version` (SORTIE_GIT_COMMIT), or
//! "unknown" when the source is not a git checkout (a crate tarball, an exported tree), and the
//! names of the extension's SQL functions (`CREATE FUNCTION` in sql/) into
//! `$OUT_DIR/extension_functions.rs`, which the start-up check compares with the database's.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// Every `CREATE FUNCTION name(` of the extension's SQL sources, sorted, without repeats.
fn extension_functions() -> Vec<String> {
    let sql = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql");
    let mut files = vec![sql.join("bootstrap.sql")];
    if let Ok(entries) = std::fs::read_dir(sql.join("engine")) {
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sql")),
        );
    }
    println!("cargo:rerun-if-changed={}", sql.join("engine").display());
    let mut names = Vec::new();
    for file in files {
        println!("cargo:rerun-if-changed={}", file.display());
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("CREATE FUNCTION ") {
                if let Some(name) = rest.split('(').next() {
                    let name = name.trim();
                    if !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        names.push(name.to_string());
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

fn main() {
    let names = extension_functions();
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("extension_functions.rs");
    std::fs::write(
        out,
        format!(
            "/// The extension's SQL functions, from sql/ at build time (build.rs).\npub const EXTENSION_FUNCTIONS: &[&str] = &{names:?};\n"
        ),
    )
    .expect("writing extension_functions.rs");
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SORTIE_GIT_COMMIT={commit}");
    // Rebuilt when HEAD moves: a checkout changes .git/HEAD, a commit changes the branch's ref
    // (or packed-refs). Without a checkout nothing is watched but this file.
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = Path::new(&git_dir);
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let path = git_dir.join(reference);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        let packed = git_dir.join("packed-refs");
        if packed.exists() {
            println!("cargo:rerun-if-changed={}", packed.display());
        }
    }
}
