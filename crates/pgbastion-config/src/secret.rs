//! Secrets (passwords, keys) never print: their Debug and Display are redacted, and their
//! memory is overwritten when they are dropped (a reload replaces them).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// A secret value. Debug and Display print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret comes from: a file (trailing newline trimmed) or an environment variable.
/// Secrets are never written inline in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {0} is not set")]
    Env(String),
    #[error("no password_file or password_env given")]
    Missing,
}

impl SecretSource {
    /// Reads the secret. The only place configuration touches the filesystem or environment.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        if let Some(path) = &self.password_file {
            let mut text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
                path: path.clone(),
                source,
            })?;
            // Trimmed in place: no copy of the secret is left behind unzeroized.
            let end = text.trim_end_matches(['\r', '\n']).len();
            text.truncate(end);
            return Ok(Secret(text));
        }
        if let Some(name) = &self.password_env {
            return std::env::var(name)
                .map(Secret)
                .map_err(|_| SecretError::Env(name.clone()));
        }
        Err(SecretError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "<redacted> <redacted>");
    }

    #[test]
    fn secret_file_is_read_without_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("pgbastion-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let source = SecretSource {
            password_file: Some(path),
            password_env: None,
        };
        assert_eq!(source.resolve().unwrap().expose(), "s3cret");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_environment_variable_is_named() {
        let source = SecretSource {
            password_file: None,
            password_env: Some("PGBASTION_TEST_SURELY_UNSET".into()),
        };
        let err = source.resolve().unwrap_err().to_string();
        assert!(err.contains("PGBASTION_TEST_SURELY_UNSET"), "{err}");
    }
}
