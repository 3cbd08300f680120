//! What every operation shares: the [`Worker`] (producer, router, connectors, state,
//! parking), durable produces, and the writes of a lane's state record.
//!
//! Below `process` (one event's operations) and `groups` (group and membership work),
//! which both build on it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;

use crate::connectors::ConnectorSet;
use crate::kafka::producer::{EventProducer, OutboundRecord, ProduceError};
use crate::metrics::Metrics;
use crate::pipeline::assignments::Assignments;
use crate::pipeline::parking::{LaneWriteLocks, RetryTopics};
use crate::pipeline::router::Router;
use crate::settings::UserPartitioner;
use crate::state::record::{StateKey, StateRecord};
use crate::state::version::EventVersion;
use crate::state::ProvisioningState;

/// What group events need to write memberships.
#[derive(Debug, Clone)]
pub struct Groups {
    pub membership_topic: String,
    /// The input's (and so the membership topic's) partition count.
    pub partitions: i32,
    pub user_partitioner: UserPartitioner,
    pub member_wait: Duration,
    pub chunk: usize,
}

impl Groups {
    /// The member's partition: where its own events are, by the producer's partitioner.
    pub fn partition_of(&self, member_key: &str) -> i32 {
        self.user_partitioner.partition(member_key.as_bytes(), self.partitions)
    }
}

/// Everything a worker needs, shared by all workers.
pub struct Worker {
    pub producer: EventProducer,
    pub router: Router,
    pub connectors: ConnectorSet,
    pub metrics: Arc<Metrics>,
    pub results_topic: String,
    pub dead_letter_topic: String,
    pub reply_topic_allow_list: Vec<String>,
    pub max_event_bytes: usize,
    /// The provisioning state, when `[state]` is enabled.
    pub state: Option<Arc<ProvisioningState>>,
    /// Which partitions are still ours: revoked work makes no new attempt.
    pub assignments: Arc<Assignments>,
    /// Durable parking, when `[parking]` and `[state]` are enabled: set at start-up once
    /// the retry topics are known.
    pub parking: OnceLock<Parking>,
    /// Groups' memberships, when `[groups]` and `[state]` are enabled: set at start-up
    /// once the membership topic is known.
    pub groups: OnceLock<Groups>,
}

/// What operations need to park and drain.
pub struct Parking {
    pub topics: RetryTopics,
    pub prefix: String,
    pub max_parked_time: Duration,
    /// Writes of a lane's record while parking and draining may overlap.
    pub lane_writes: LaneWriteLocks,
}

/// What the provisioning state needs to know about one (connector, user) lane.
pub struct Lane<'a> {
    pub state: &'a ProvisioningState,
    pub version: &'a EventVersion,
    pub key: StateKey,
    /// The input partition: state records go to the same partition number.
    pub partition: i32,
}

/// A drained operation (at `drained_offset` of its retry topic) that wrote no state
/// record of its own: clear the lane's parked mark unless work parked after it.
pub async fn clear_parked_mark(worker: &Worker, lane: &Lane<'_>, parking: &Parking, drained_offset: i64) {
    update_state(worker, lane, parking, |current| {
        let current = current?;
        let parked_until = drained_past(current.parked_until, drained_offset);
        (parked_until != current.parked_until).then(|| StateRecord {
            parked_until,
            updated_at: Utc::now(),
            ..current
        })
    })
    .await;
}

/// The lane's parked mark once the drain has passed `drained_offset`: it stays while
/// work parked after that offset waits.
pub fn drained_past(parked_until: Option<i64>, drained_offset: i64) -> Option<i64> {
    parked_until.filter(|until| *until > drained_offset)
}

/// What a state write does with its lane's parked mark.
pub enum Mark<'a> {
    /// New work that ran directly (its lane was not parked): the mark is kept as read.
    Keep(Option<i64>),
    /// Parked work read back at this retry offset: the mark is read again under the
    /// lane's write lock, as newer work may be parking behind it meanwhile.
    DrainedPast(i64, &'a Parking),
}

/// Writes a lane's record computed from its current one (none written for `None`),
/// under the lane's write lock.
pub async fn update_state(
    worker: &Worker,
    lane: &Lane<'_>,
    parking: &Parking,
    next: impl FnOnce(Option<StateRecord>) -> Option<StateRecord>,
) {
    let _guard = parking.lane_writes.lock(&lane.key).await;
    let current = lane.state.lookup(lane.partition, &lane.key);
    if let Some(record) = next(current) {
        publish_state(worker, lane, &record).await;
    }
}

/// Writes a state record to the state topic, on the input record's partition number,
/// and once acknowledged to the local store.
pub async fn publish_state(worker: &Worker, lane: &Lane<'_>, record: &StateRecord) {
    let payload = record.encode();
    let encoded_key = lane.key.encode();
    // Retried until written: only dead letters give up (see produce_durably).
    let _ = produce_durably(
        worker,
        "state",
        OutboundRecord {
            topic: lane.state.topic(),
            partition: Some(lane.partition),
            key: Some(encoded_key.as_bytes()),
            payload: &payload,
            headers: vec![("content-type", b"application/json")],
        },
    )
    .await;
    lane.state.remember(lane.partition, &lane.key, record);
}

/// Produces until the broker acknowledges, backing off between failures. It never gives
/// up on a failure that may pass (the input offset must not move past an event whose
/// outputs are not durable; at shutdown the drain's grace period bounds it and an
/// aborted event is redone). A dead letter too large to ever be written is returned as
/// an error at once, for its caller to truncate: retrying it would wedge the partition.
pub async fn produce_durably(
    worker: &Worker,
    destination: &str,
    record: OutboundRecord<'_>,
) -> Result<i64, ProduceError> {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = OutboundRecord {
            topic: record.topic,
            partition: record.partition,
            key: record.key,
            payload: record.payload,
            headers: record.headers.clone(),
        };
        match worker.producer.send_for_offset(attempt).await {
            Ok(offset) => return Ok(offset),
            // Only a dead letter carries an arbitrary payload, and only its caller can
            // shrink it. Results, replies and state records are small: a topic that
            // refuses them is misconfigured, and retrying (visibly) loses nothing.
            Err(error) if error.is_too_large() && destination == "dead_letter" => {
                worker.metrics.produce_failures.with_label_values(&[destination]).inc();
                return Err(error);
            }
            Err(error) => {
                worker.metrics.produce_failures.with_label_values(&[destination]).inc();
                if destination == "reply" {
                    worker.metrics.reply_publish_failures.inc();
                }
                tracing::warn!(destination, topic = record.topic, error = %error, delay_ms = delay.as_millis() as u64, "Produce failed; retrying.");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
