//! `[state]`: where the provisioning state lives.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Keep a provisioning state (on by default). Off, every event is applied whatever
    /// its age and updates and deletes search the target: the behaviour before the
    /// state existed, kept for a migration and for benchmarks' baselines.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The compacted topic that is the state's source of truth. It must have
    /// `cleanup.policy=compact` and as many partitions as the input topic.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// The local store's directory (a cache of the topic; a missing or broken one is
    /// rebuilt). Relative paths are taken from the working directory. Give each
    /// instance its own (a Kubernetes volume per pod).
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// Bump it after re-creating or mirroring the input topic, whose offsets then start
    /// again: events of a higher epoch are newer than anything applied before.
    #[serde(default)]
    pub version_epoch: u32,
    /// How long restoring one partition may take before the service gives up and exits
    /// (a restart then resumes from the local store's checkpoint).
    #[serde(default = "default_restore_timeout", with = "humantime_serde")]
    pub restore_timeout: Duration,
}

impl StateSettings {
    /// Checks what serde cannot, reporting each problem with its key.
    pub fn check(&self, problem: &mut impl FnMut(String, String)) {
        if self.topic.trim().is_empty() {
            problem("state.topic".into(), "must not be empty".into());
        }
        if self.dir.as_os_str().is_empty() {
            problem("state.dir".into(), "must not be empty".into());
        }
        if self.restore_timeout < Duration::from_secs(1) {
            problem("state.restore_timeout".into(), "must be at least 1s".into());
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_topic() -> String {
    "provisioner.state".into()
}
fn default_dir() -> PathBuf {
    PathBuf::from("provisioner-state")
}
fn default_restore_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: default_topic(),
            dir: default_dir(),
            version_epoch: 0,
            restore_timeout: default_restore_timeout(),
        }
    }
}
