//! Durable parking: when a connector cannot make progress, its work waits in its retry
//! topic instead of in memory, and the input moves on.
//!
//! - **When.** A connector parks its new work while its circuit has been open longer
//!   than `parking.park_after`, or while it holds more than
//!   `parking.max_held_operations` operations; it stops once its circuit is closed and
//!   it holds at most half that ([`ParkingMonitor`]).
//! - **Where.** Retry topic partition p takes the work of input partition p, and the
//!   consumer assigns it together with input partition p (see `kafka::consumer`), so
//!   the owner of a user's input partition owns its parked work too.
//! - **Order.** A (user, connector) lane with parked work is marked in the provisioning
//!   state (`StateRecord::parked_until`); newer operations for the lane are parked
//!   behind it until the drain has passed that offset, so none overtakes, across
//!   restarts, rebalances and instances.
//! - **Drain.** Parked operations are read back through the same lanes. They wait on
//!   the connector's gate (they are the probes that find the target back) and retry
//!   until `parking.max_parked_time` after they were parked; then they fail for good.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kafka::retry_topics::{self, RetryTopicError};
use crate::kafka::settings::KafkaSettings;
use crate::kafka::state_topic::{self, StateTopicError};
use crate::metrics::Metrics;
use crate::settings::ParkingSettings;
use crate::state::record::StateKey;

/// The connector a parked operation belongs to.
pub const CONNECTOR_HEADER: &str = "x-provisioner-connector";
/// When it was first parked (RFC 3339); it expires `max_parked_time` later.
pub const PARKED_AT_HEADER: &str = "x-provisioner-parked-at";
/// Whether its binding was blocking (for the result).
pub const BLOCKING_HEADER: &str = "x-provisioner-blocking";
/// Dead-letter reason of parked work whose connector is no longer configured.
pub const CONNECTOR_REMOVED_REASON: &str = "connector_removed";
/// Dead-letter reason of parked work that waited longer than `max_parked_time`.
pub const PARKED_TOO_LONG_REASON: &str = "parked_too_long";

#[derive(Debug, thiserror::Error)]
pub enum ParkingError {
    #[error("retry topic: {0}")]
    Topic(#[from] RetryTopicError),
    #[error("retry topic: {0}")]
    Describe(#[from] StateTopicError),
    #[error("retry topic `{topic}` does not exist and parking.create_topics is false; create it with {partitions} partitions (as many as `{input}`)")]
    Missing {
        topic: String,
        input: String,
        partitions: usize,
    },
    #[error("retry topic `{topic}` has {found} partitions but the input topic `{input}` has {expected}: partition p of each must go together")]
    PartitionMismatch {
        topic: String,
        input: String,
        found: usize,
        expected: usize,
    },
    #[error("retry topic `{topic}` keeps records for retention.ms={retention_ms}, shorter than parking.max_parked_time ({max_parked_ms} ms): parked work would be deleted before it expires; raise its retention.ms")]
    RetentionTooShort {
        topic: String,
        retention_ms: i64,
        max_parked_ms: u128,
    },
}

impl ParkingError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ParkingError::Topic(error) => error.is_retryable(),
            ParkingError::Describe(error) => error.is_retryable(),
            _ => false,
        }
    }
}

/// The retry topics this instance consumes: each configured connector's, plus any left
/// over from a connector since removed (its work is dead-lettered).
#[derive(Debug, Clone, Default)]
pub struct RetryTopics {
    /// Topic name → the connector it belongs to; `None` for a removed connector's.
    pub topics: BTreeMap<String, Option<String>>,
}

impl RetryTopics {
    pub fn names(&self) -> Vec<String> {
        self.topics.keys().cloned().collect()
    }

    pub fn is_retry_topic(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    pub fn connector_of(&self, topic: &str) -> Option<&str> {
        self.topics.get(topic).and_then(|connector| connector.as_deref())
    }
}

/// Start-up: every configured connector's retry topic exists (created if allowed)
/// with the input's partition count and a retention longer than `max_parked_time`;
/// retry topics of removed connectors are found so that their work is dead-lettered.
pub async fn prepare_retry_topics(
    kafka: &KafkaSettings,
    parking: &ParkingSettings,
    connectors: &[String],
    input: &str,
) -> Result<RetryTopics, ParkingError> {
    let input_partitions = state_topic::describe_topic(kafka, input, false)
        .await?
        .map(|facts| facts.partitions)
        .unwrap_or(0);
    let mut topics = BTreeMap::new();
    for connector in connectors {
        let topic = parking.retry_topic(connector);
        check_or_create(kafka, parking, &topic, input, input_partitions).await?;
        topics.insert(topic, Some(connector.clone()));
    }
    let prefix = parking.topic_prefix.clone();
    let settings = kafka.clone();
    let existing = tokio::task::spawn_blocking(move || retry_topics::topics_with_prefix(&settings, &prefix))
        .await
        .expect("metadata task")?;
    for topic in existing {
        if let std::collections::btree_map::Entry::Vacant(vacant) = topics.entry(topic) {
            tracing::warn!(topic = %vacant.key(), "A retry topic of a connector no longer configured: its parked work is dead-lettered.");
            vacant.insert(None);
        }
    }
    Ok(RetryTopics { topics })
}

async fn check_or_create(
    kafka: &KafkaSettings,
    parking: &ParkingSettings,
    topic: &str,
    input: &str,
    input_partitions: usize,
) -> Result<(), ParkingError> {
    let facts = match state_topic::describe_topic(kafka, topic, false).await? {
        Some(facts) => facts,
        None if parking.create_topics && input_partitions > 0 => {
            let retention = parking.max_parked_time * 2;
            retry_topics::create_topic(kafka, topic, input_partitions as i32, retention).await?;
            tracing::info!(
                topic,
                partitions = input_partitions,
                retention_ms = retention.as_millis() as u64,
                "Retry topic created."
            );
            return Ok(());
        }
        None => {
            return Err(ParkingError::Missing {
                topic: topic.into(),
                input: input.into(),
                partitions: input_partitions,
            })
        }
    };
    if facts.partitions != input_partitions {
        return Err(ParkingError::PartitionMismatch {
            topic: topic.into(),
            input: input.into(),
            found: facts.partitions,
            expected: input_partitions,
        });
    }
    Ok(())
}

/// Refuses to run when a retry topic would delete parked work before it expires. Run
/// while the consumer joins its group: a broker that cannot describe configs
/// (librdkafka's mock cluster) takes a request timeout to say so, and is let through
/// with a warning.
pub async fn check_retention(
    kafka: &KafkaSettings,
    parking: &ParkingSettings,
    topics: &[String],
) -> Result<(), ParkingError> {
    for topic in topics {
        let Some(facts) = state_topic::describe_topic(kafka, topic, true).await? else {
            continue;
        };
        match facts.retention_ms {
            None => {
                tracing::warn!(topic = %topic, "The broker did not describe the retry topic's configuration; cannot check its retention.")
            }
            Some(retention_ms)
                if retention_ms >= 0 && (retention_ms as u128) <= parking.max_parked_time.as_millis() =>
            {
                return Err(ParkingError::RetentionTooShort {
                    topic: topic.clone(),
                    retention_ms,
                    max_parked_ms: parking.max_parked_time.as_millis(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// One connector's parking state, kept by the pipeline loop.
struct ConnectorParking {
    /// Shared with its running operations: they park instead of waiting on.
    parking: Arc<AtomicBool>,
    circuit_open_since: Option<Instant>,
    retry_paused: bool,
}

/// What changed for a connector at an evaluation.
/// Serialises the state writes of one lane while a drained operation and the parking
/// of newer work behind it run at the same time (see `lanes`): each write reads the
/// lane's record afresh under the lock, so a parked mark is neither lost nor moved
/// back, and a mark never carries an older record's fields over a newer one.
#[derive(Default)]
pub struct LaneWriteLocks {
    locks: Mutex<HashMap<StateKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one lane's record is read and written.
pub struct LaneWriteGuard<'a> {
    locks: &'a LaneWriteLocks,
    key: StateKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl LaneWriteLocks {
    pub async fn lock(&self, key: &StateKey) -> LaneWriteGuard<'_> {
        let lock = self
            .locks
            .lock()
            .expect("lane locks poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        LaneWriteGuard {
            locks: self,
            key: key.clone(),
            guard: Some(guard),
        }
    }

    /// Lanes with a lock held or awaited.
    pub fn len(&self) -> usize {
        self.locks.lock().expect("lane locks poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for LaneWriteGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().expect("lane locks poisoned");
        // Only the map's own reference left: nobody holds or awaits this lane's lock.
        if locks.get(&self.key).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            locks.remove(&self.key);
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// `Some(true)`: pause its retry partitions; `Some(false)`: resume them.
    pub retry_paused: Option<bool>,
}

/// Decides, per connector, whether new work parks and whether its retry partitions are
/// read. Evaluated by the pipeline loop; the flags are read by running operations.
pub struct ParkingMonitor {
    enabled: bool,
    park_after: Duration,
    max_held: usize,
    connectors: HashMap<String, ConnectorParking>,
    metrics: Arc<Metrics>,
}

impl ParkingMonitor {
    pub fn new(settings: &ParkingSettings, max_held: usize, enabled: bool, metrics: Arc<Metrics>) -> ParkingMonitor {
        ParkingMonitor {
            enabled,
            park_after: settings.park_after,
            max_held,
            connectors: HashMap::new(),
            metrics,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The flag `connector`'s operations watch.
    pub fn flag(&mut self, connector: &str) -> Arc<AtomicBool> {
        self.entry(connector).parking.clone()
    }

    pub fn is_parking(&self, connector: &str) -> bool {
        self.connectors
            .get(connector)
            .is_some_and(|entry| entry.parking.load(Ordering::Relaxed))
    }

    fn entry(&mut self, connector: &str) -> &mut ConnectorParking {
        self.connectors
            .entry(connector.to_string())
            .or_insert_with(|| ConnectorParking {
                parking: Arc::new(AtomicBool::new(false)),
                circuit_open_since: None,
                retry_paused: false,
            })
    }

    /// Re-evaluates `connector` given its circuit and the operations it holds.
    /// `shared`: other connectors run beside it. Holding too much parks only then: with
    /// one connector, parking would help no other target and only add writes, and
    /// back-pressure is the right answer to a slow one.
    pub fn evaluate(&mut self, connector: &str, circuit_open: bool, held: usize, shared: bool, now: Instant) -> Change {
        let enabled = self.enabled;
        let park_after = self.park_after;
        let max_held = self.max_held;
        let metrics = self.metrics.clone();
        let entry = self.entry(connector);
        entry.circuit_open_since = match (circuit_open, entry.circuit_open_since) {
            (true, since) => Some(since.unwrap_or(now)),
            (false, _) => None,
        };
        let mut change = Change::default();
        if !enabled {
            return change;
        }
        let open_too_long = entry
            .circuit_open_since
            .is_some_and(|since| now.duration_since(since) >= park_after);
        let parking = entry.parking.load(Ordering::Relaxed);
        if !parking && (open_too_long || (shared && held > max_held)) {
            tracing::warn!(
                connector,
                held,
                circuit_open,
                "Connector cannot keep up: parking its new work in its retry topic."
            );
            entry.parking.store(true, Ordering::Relaxed);
            metrics.connector_parking.with_label_values(&[connector]).set(1);
        } else if parking && !circuit_open && (!shared || held <= max_held / 2) {
            tracing::info!(connector, held, "Connector keeps up again: its new work runs directly.");
            entry.parking.store(false, Ordering::Relaxed);
            metrics.connector_parking.with_label_values(&[connector]).set(0);
        }
        // Parked work read back waits in memory: stop reading it at the same bound.
        if !entry.retry_paused && held >= max_held {
            entry.retry_paused = true;
            change.retry_paused = Some(true);
        } else if entry.retry_paused && held <= max_held / 2 {
            entry.retry_paused = false;
            change.retry_paused = Some(false);
        }
        change
    }

    /// Whether `connector`'s retry partitions are paused for its own bound.
    pub fn retry_paused(&self, connector: &str) -> bool {
        self.connectors.get(connector).is_some_and(|entry| entry.retry_paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor() -> ParkingMonitor {
        let settings = ParkingSettings {
            park_after: Duration::from_secs(30),
            ..ParkingSettings::default()
        };
        ParkingMonitor::new(&settings, 100, true, Arc::new(Metrics::new()))
    }

    #[test]
    fn an_open_circuit_parks_only_after_park_after() {
        let mut monitor = monitor();
        let start = Instant::now();
        monitor.evaluate("google", true, 5, true, start);
        assert!(!monitor.is_parking("google"));
        monitor.evaluate("google", true, 5, true, start + Duration::from_secs(29));
        assert!(!monitor.is_parking("google"));
        monitor.evaluate("google", true, 5, true, start + Duration::from_secs(30));
        assert!(monitor.is_parking("google"));
        assert!(!monitor.is_parking("scim"), "other connectors are not affected");
        // Closed again, and holding little: parking stops.
        monitor.evaluate("google", false, 5, true, start + Duration::from_secs(31));
        assert!(!monitor.is_parking("google"));
    }

    #[test]
    fn holding_too_much_parks_and_pauses_the_drain_with_hysteresis() {
        let mut monitor = monitor();
        let now = Instant::now();
        assert_eq!(
            monitor.evaluate("google", false, 100, true, now),
            Change {
                retry_paused: Some(true)
            }
        );
        assert!(!monitor.is_parking("google"), "at the bound, not above it");
        monitor.evaluate("google", false, 101, true, now);
        assert!(monitor.is_parking("google"));
        assert_eq!(
            monitor.evaluate("google", false, 60, true, now),
            Change::default(),
            "above half: no change"
        );
        assert!(monitor.is_parking("google"));
        assert_eq!(
            monitor.evaluate("google", false, 50, true, now),
            Change {
                retry_paused: Some(false)
            }
        );
        assert!(!monitor.is_parking("google"));
    }

    #[test]
    fn a_lone_connector_parks_for_its_circuit_not_for_its_backlog() {
        let mut monitor = monitor();
        let start = Instant::now();
        monitor.evaluate("scim", false, 10_000, false, start);
        assert!(
            !monitor.is_parking("scim"),
            "back-pressure, not parking, slows a lone connector"
        );
        monitor.evaluate("scim", true, 10_000, false, start);
        monitor.evaluate("scim", true, 10_000, false, start + Duration::from_secs(30));
        assert!(
            monitor.is_parking("scim"),
            "a circuit open past park_after parks even a lone connector"
        );
    }

    #[test]
    fn disabled_parking_never_parks() {
        let settings = ParkingSettings::default();
        let mut monitor = ParkingMonitor::new(&settings, 100, false, Arc::new(Metrics::new()));
        monitor.evaluate("google", true, 1_000_000, true, Instant::now());
        assert!(!monitor.is_parking("google"));
    }

    #[tokio::test]
    async fn a_lane_write_lock_is_exclusive_and_forgotten_once_released() {
        let locks = LaneWriteLocks::default();
        let key = StateKey {
            connector: "google".into(),
            user_key: "acme/alice".into(),
        };
        let first = locks.lock(&key).await;
        let second = tokio::time::timeout(Duration::from_millis(20), locks.lock(&key)).await;
        assert!(second.is_err(), "a second writer of the lane waits");
        let other = StateKey {
            connector: "google".into(),
            user_key: "acme/bob".into(),
        };
        drop(locks.lock(&other).await);
        drop(first);
        assert!(locks.is_empty(), "released locks are not kept");
        drop(locks.lock(&key).await);
        assert!(locks.is_empty());
    }
}
