//! The error of a config key whose value is not allowed, shared by the sections that validate
//! their own keys (`[method]`, `[train]`) so the run config can name the key in one way.

/// A config key whose value is not allowed: `key` is `section.name`, `message` the whole
/// explanation, starting with the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidKey {
    pub key: String,
    pub message: String,
}

impl InvalidKey {
    /// `<section>.<key> <rule>`: the key and what its value must be.
    pub fn new(section: &str, key: &str, rule: String) -> Self {
        InvalidKey {
            key: format!("{section}.{key}"),
            message: format!("{section}.{key} {rule}"),
        }
    }
}
