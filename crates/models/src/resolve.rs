//! What `--model` names: a GGUF file, a model directory, or a Hugging Face repository id (`org/name`) found in
//! the local Hugging Face cache, with no network access.
//!
//! ```text
//!   $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
//!     models--org--name/refs/main          → the revision
//!     models--org--name/snapshots/<rev>/   → the directory (or its single .gguf file)
//! ```

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Bytes of weights at `path`: a GGUF file's size, or a directory's weight files (safetensors, GGUF)
/// together, following links (Hugging Face cache snapshots link to blobs).
pub fn weight_bytes(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("safetensors" | "gguf")) {
            total += std::fs::metadata(&p)?.len();
        }
    }
    Ok(total)
}

/// Resolves `--model`: an existing path as it is, else a repository id in the Hugging Face cache. A missing
/// model is an error naming every path tried.
pub fn resolve_model(arg: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let mut tried = vec![arg.display().to_string()];
    if let Some(id) = arg.to_str().filter(|s| is_repo_id(s)) {
        let (org, name) = id.split_once('/').expect("checked by is_repo_id");
        let repo = hub_cache().join(format!("models--{org}--{name}"));
        let snapshots = repo.join("snapshots");
        let revision = std::fs::read_to_string(repo.join("refs").join("main")).ok().map(|r| r.trim().to_string());
        let snapshot = match revision {
            Some(rev) => Some(snapshots.join(rev)),
            // No refs/main: the only snapshot there is.
            None => std::fs::read_dir(&snapshots).ok().and_then(|entries| {
                let dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
                (dirs.len() == 1).then(|| dirs[0].clone())
            }),
        };
        match snapshot {
            Some(s) if s.is_dir() => return Ok(single_gguf(&s).unwrap_or(s)),
            Some(s) => tried.push(s.display().to_string()),
            None => tried.push(snapshots.display().to_string()),
        }
    }
    Err(Error::Io {
        path: arg.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no model there (tried {})", tried.join(", ")),
        ),
    })
}

/// `org/name`: two non-empty parts of letters, digits, `-`, `_` and `.`, not a relative path like `./x`.
fn is_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

fn hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// A snapshot holding no `config.json` but exactly one `.gguf` file is that file.
fn single_gguf(dir: &Path) -> Option<PathBuf> {
    if dir.join("config.json").is_file() {
        return None;
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    (ggufs.len() == 1).then(|| ggufs[0].clone())
}

/// Checks, without loading weights, that `path` (resolved) is a model we can load: a GGUF file whose header
/// and configuration read, or a model directory whose configuration and safetensors headers read.
pub fn probe(path: &Path) -> Result<()> {
    if path.is_dir() {
        if !crate::hf::HfDir::is_model_dir(path) {
            return Err(Error::Io {
                path: path.join("config.json"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory (no config.json)"),
            });
        }
        crate::hf::HfDir::open(path)?.model_config()?;
        return Ok(());
    }
    let g = crate::gguf::GgufFile::open(path)?;
    crate::config::ModelConfig::from_gguf(&g)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_ids_resolve_in_the_hub_cache_and_misses_name_the_paths_tried() {
        let root = std::env::temp_dir().join(format!("mlx-serving-hub-{}", std::process::id()));
        let repo = root.join("models--acme--tiny-model");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        // Only this test reads the variable.
        std::env::set_var("HF_HUB_CACHE", &root);
        assert_eq!(resolve_model(Path::new("acme/tiny-model")).unwrap(), snap);
        let e = resolve_model(Path::new("acme/missing")).unwrap_err().to_string();
        assert!(e.contains("acme/missing") && e.contains("models--acme--missing"), "{e}");
        let e = resolve_model(Path::new("./nowhere.gguf")).unwrap_err().to_string();
        assert!(e.contains("nowhere.gguf"), "{e}");
        assert!(!is_repo_id("./x") && !is_repo_id("a/b/c") && is_repo_id("Qwen/Qwen2.5-0.5B-Instruct"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
