//! A credential value that cannot leak through `Debug`, `Display` or serialisation.
//!
//! Settings hold passwords, client secrets, tokens and private keys as [`Secret`].
//! The only way to read one is [`Secret::expose`], so every use is greppable.
//! Where a secret comes from (inline, `*_env` or `*_file`) is resolved here, on the raw
//! configuration tree before deserialisation ([`resolve_secret_references`]); by the
//! time a `Secret` exists it is a value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What every secret prints as, in logs, errors and `check-config` output.
pub const REDACTED: &str = "[redacted]";

/// Keys whose values are credentials. Each accepts `<key>_env` and `<key>_file` forms.
pub const SECRET_KEYS: &[&str] = &[
    "password",
    "token",
    "client_secret",
    "api_key",
    "default_password",
    "private_key",
    "service_account_key",
    "security_token",
    "sasl_password",
    "ssl_key_password",
];

/// A `*_env` or `*_file` reference that cannot be resolved, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretReferenceError {
    pub key: String,
    pub message: String,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The plaintext. Call it only where the value goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Rewrites `<secret>_env` and `<secret>_file` keys into `<secret>` with the value read
/// from the environment or the file. Relative file paths are taken from the config
/// file's directory.
pub fn resolve_secret_references(
    node: &mut config::Value,
    path: &str,
    base_directory: Option<&Path>,
    environment: &BTreeMap<String, String>,
) -> Result<(), SecretReferenceError> {
    match &mut node.kind {
        config::ValueKind::Table(table) => {
            let keys: Vec<String> = table.keys().cloned().collect();
            for key in keys {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let reference = SECRET_KEYS.iter().find_map(|secret| {
                    if key == format!("{secret}_env") {
                        Some((*secret, SecretReference::Environment))
                    } else if key == format!("{secret}_file") {
                        Some((*secret, SecretReference::File))
                    } else {
                        None
                    }
                });
                match reference {
                    Some((secret, kind)) => {
                        let target_path = if path.is_empty() {
                            secret.to_string()
                        } else {
                            format!("{path}.{secret}")
                        };
                        if table.contains_key(secret) {
                            return Err(SecretReferenceError {
                                key: child_path,
                                message: format!("`{target_path}` is also set; give a secret one way only"),
                            });
                        }
                        let reference_value = table.remove(&key).expect("key listed above");
                        let reference_text = reference_value.into_string().map_err(|_| SecretReferenceError {
                            key: child_path.clone(),
                            message: "must be a string".into(),
                        })?;
                        let resolved = match kind {
                            SecretReference::Environment => {
                                environment
                                    .get(&reference_text)
                                    .cloned()
                                    .ok_or_else(|| SecretReferenceError {
                                        key: child_path.clone(),
                                        message: format!("environment variable `{reference_text}` is not set"),
                                    })?
                            }
                            SecretReference::File => {
                                let file = base_directory
                                    .map(|directory| directory.join(&reference_text))
                                    .unwrap_or_else(|| PathBuf::from(&reference_text));
                                let contents =
                                    std::fs::read_to_string(&file).map_err(|error| SecretReferenceError {
                                        key: child_path.clone(),
                                        message: format!("cannot read `{}`: {error}", file.display()),
                                    })?;
                                contents.trim_end_matches(['\r', '\n']).to_string()
                            }
                        };
                        table.insert(
                            secret.to_string(),
                            config::Value::new(None, config::ValueKind::String(resolved)),
                        );
                    }
                    None => {
                        if let Some(child) = table.get_mut(&key) {
                            resolve_secret_references(child, &child_path, base_directory, environment)?;
                        }
                    }
                }
            }
        }
        config::ValueKind::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                resolve_secret_references(item, &format!("{path}[{index}]"), base_directory, environment)?;
            }
        }
        _ => {}
    }
    Ok(())
}

enum SecretReference {
    Environment,
    File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_serialize_never_show_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&secret).unwrap(), format!("\"{REDACTED}\""));
        assert_eq!(secret.expose(), "hunter2");
    }
}
