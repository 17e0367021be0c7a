//! `[[prewarm]]` entries: images this node keeps pulled ahead of the pods that need them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `once`: pull until it succeeds (within the backoff limit and deadline), then leave it.
/// `keep`: also re-check every `interval` and re-pull when the image went missing or its tag moved.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Once,
    Keep,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrewarmEntry {
    /// Image reference, as a pod spec would write it.
    pub image: String,
    /// Higher first; urgent (pod) pulls always come before any prewarm.
    #[serde(
        default,
        deserialize_with = "crate::config::units::whole::<_, _, -2147483648, 2147483647>"
    )]
    pub priority: i32,
    #[serde(default)]
    pub policy: Policy,
    /// `keep`: how often the image is re-checked (a random 10 % is added, so nodes spread out).
    #[serde(default = "default_interval", with = "crate::config::units::duration")]
    pub interval: Duration,
    /// One attempt may take this long (0: no limit).
    #[serde(default, with = "crate::config::units::duration")]
    pub timeout: Duration,
    /// Failed attempts retried with exponential backoff (10 s doubling, at most 10 min) this many
    /// times before the round is given up.
    #[serde(
        default = "default_backoff_limit",
        deserialize_with = "crate::config::units::whole::<_, _, 0, 1000>"
    )]
    pub backoff_limit: u32,
    /// A round (first attempt to success or giving up) may take this long (0: no limit).
    #[serde(default, with = "crate::config::units::duration")]
    pub deadline: Duration,
    /// Docker `config.json` with credentials for the image's registry (none: anonymous).
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Its node label's name while the image is present (`node_labels`); derived from the
    /// reference when not given.
    #[serde(default)]
    pub label: Option<String>,
}

fn default_interval() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_backoff_limit() -> u32 {
    6
}
