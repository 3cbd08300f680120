//! The event consumer: consumer-group membership, manual offset storage, pausing,
//! rebalance hooks and lag statistics.
//!
//! Offsets follow librdkafka's at-least-once recipe: `enable.auto.offset.store=false`
//! (we store an offset only once everything before it is finished) and
//! `enable.auto.commit=true` (librdkafka commits what was stored every
//! `commit_interval`, on revoke and on close).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use crate::kafka::settings::KafkaSettings;
use crate::kafka::{apply_overrides, base_client_config, InboundRecord};
use crate::metrics::Metrics;

/// A topic and partition.
pub type TopicPartition = (String, i32);

/// Told about partition ownership changes, synchronously, from inside the consumer's
/// poll. The pipeline uses it to forget work for partitions it no longer owns.
pub trait PartitionListener: Send + Sync + 'static {
    fn assigned(&self, partitions: &[TopicPartition]);
    fn revoked(&self, partitions: &[TopicPartition]);
}

/// Told whether the consumer holds an assignment, for the readiness probe. An empty
/// assignment counts (more instances than partitions). The service passes its
/// `admin::Readiness`; this module does not know it.
pub trait AssignmentObserver: Send + Sync + 'static {
    fn set_consumer_assigned(&self, assigned: bool);
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot create the Kafka consumer: {0}")]
    Create(#[source] KafkaError),
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("consumer error: {0}")]
    Receive(#[source] KafkaError),
}

impl ConsumeError {
    /// librdkafka raised a fatal error: this consumer instance cannot go on (e.g. it was
    /// fenced); the process must stop and be restarted.
    pub fn is_fatal(&self) -> bool {
        match self {
            ConsumeError::Receive(error) => error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal),
            ConsumeError::Create(_) | ConsumeError::Subscribe { .. } => true,
        }
    }

    /// Receive errors are transient (broker restarts, rebalances); librdkafka recovers.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsumeError::Create(_) | ConsumeError::Subscribe { .. } => false,
            ConsumeError::Receive(_) => true,
        }
    }
}

/// librdkafka callbacks: rebalances, commits and statistics.
pub struct ConsumerHooks {
    metrics: Arc<Metrics>,
    readiness: Arc<dyn AssignmentObserver>,
    listener: Arc<dyn PartitionListener>,
    assignment: Mutex<BTreeSet<TopicPartition>>,
    /// The input topics (subscribed) and the companion topics (retry topics) whose
    /// partition p goes with input partition p: assigned and revoked together with it
    /// in the rebalance callback, not through a subscription of their own, so that the
    /// owner of an input partition is always the owner of its parked work.
    inputs: Vec<String>,
    companions: Mutex<Vec<String>>,
}

impl ConsumerHooks {
    /// Adds to `list` the companion partitions of the input partitions it holds.
    fn add_companions(&self, list: &mut TopicPartitionList) {
        let companions = self.companions.lock().expect("companions lock").clone();
        if companions.is_empty() {
            return;
        }
        let inputs: Vec<i32> = list
            .elements()
            .iter()
            .filter(|element| self.inputs.iter().any(|input| input == element.topic()))
            .map(|element| element.partition())
            .collect();
        for partition in inputs {
            for companion in &companions {
                if list.find_partition(companion, partition).is_none() {
                    list.add_partition(companion, partition);
                }
            }
        }
    }
}

impl ClientContext for ConsumerHooks {
    fn stats(&self, statistics: Statistics) {
        for (topic_name, topic) in &statistics.topics {
            for (partition_id, partition) in &topic.partitions {
                // Lag against the *stored* offset is what is left to finish (we store only
                // finished work); the committed lag trails it by one commit interval.
                // librdkafka reports -1 when unknown, and the internal UA partition as -1.
                let lag = if partition.consumer_lag_stored >= 0 {
                    partition.consumer_lag_stored
                } else {
                    partition.consumer_lag
                };
                if *partition_id < 0 || lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic_name.as_str(), partition_id.to_string().as_str()])
                    .set(lag);
            }
        }
    }
}

impl ConsumerContext for ConsumerHooks {
    /// librdkafka's default handling, with the companion partitions added to each
    /// assignment and revocation.
    fn rebalance(&self, base_consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let assigning = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        let revoking = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS;
        if assigning || revoking {
            self.add_companions(tpl);
        }
        let rebalance = if assigning {
            Rebalance::Assign(tpl)
        } else if revoking {
            Rebalance::Revoke(tpl)
        } else {
            let code: RDKafkaErrorCode = err.into();
            Rebalance::Error(KafkaError::Rebalance(code))
        };
        self.pre_rebalance(base_consumer, &rebalance);
        let cooperative = matches!(base_consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let applied = match (assigning, revoking, cooperative) {
            (true, _, true) => base_consumer.incremental_assign(tpl),
            (true, _, false) => base_consumer.assign(tpl),
            (_, true, true) => base_consumer.incremental_unassign(tpl),
            (_, true, false) => base_consumer.unassign(),
            _ => Ok(()),
        };
        if let Err(error) = applied {
            tracing::error!(error = %error, "Applying the rebalance failed.");
        }
        self.post_rebalance(base_consumer, &rebalance);
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = topic_partitions(list);
            tracing::info!(partitions = ?revoked, "Partitions revoked.");
            self.listener.revoked(&revoked);
            let mut assignment = self.assignment.lock().expect("assignment lock");
            for partition in &revoked {
                assignment.remove(partition);
                let _ = self
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[partition.0.as_str(), partition.1.to_string().as_str()]);
            }
            self.metrics.assigned_partitions.set(assignment.len() as i64);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned = topic_partitions(list);
                tracing::info!(partitions = ?assigned, "Partitions assigned.");
                self.listener.assigned(&assigned);
                let mut assignment = self.assignment.lock().expect("assignment lock");
                assignment.extend(assigned);
                self.metrics.assigned_partitions.set(assignment.len() as i64);
                // "Has its assignment" includes an empty one: more instances than partitions.
                self.readiness.set_consumer_assigned(true);
            }
            Rebalance::Revoke(_) => {
                let assignment = self.assignment.lock().expect("assignment lock");
                if assignment.is_empty() {
                    self.readiness.set_consumer_assigned(false);
                }
            }
            Rebalance::Error(error) => {
                tracing::warn!(error = %error, "Rebalance failed.");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.metrics.offset_commits.with_label_values(&["ok"]).inc(),
            // Nothing was stored since the last commit: not an error.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => {
                self.metrics.offset_commits.with_label_values(&["error"]).inc();
                tracing::warn!(error = %error, offsets = ?topic_partitions(offsets), "Offset commit failed; it is retried with the next commit.");
            }
        }
    }
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|element| (element.topic().to_string(), element.partition()))
        .collect()
}

pub struct EventConsumer {
    consumer: StreamConsumer<ConsumerHooks>,
    topics: Vec<String>,
}

impl EventConsumer {
    pub fn new(
        settings: &KafkaSettings,
        metrics: Arc<Metrics>,
        readiness: Arc<dyn AssignmentObserver>,
        listener: Arc<dyn PartitionListener>,
    ) -> Result<EventConsumer, ConsumeError> {
        let mut config = base_client_config(settings);
        config
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                settings.commit_interval.as_millis().to_string(),
            )
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.partition.eof", "false")
            // Bound prefetch memory: the default (64 MiB) is most of our budget. Back-
            // pressure keeps the prefetch (it stops reading before it pauses), so this adds
            // to the uncommitted window's memory; 4 MiB refills the window fast enough.
            .set("queued.max.messages.kbytes", "4096")
            .set("fetch.wait.max.ms", "100")
            .set("statistics.interval.ms", "5000");
        apply_overrides(&mut config, settings);
        let hooks = ConsumerHooks {
            metrics,
            readiness,
            listener,
            assignment: Mutex::new(BTreeSet::new()),
            inputs: settings.event_topics.clone(),
            companions: Mutex::new(Vec::new()),
        };
        let consumer = config.create_with_context(hooks).map_err(ConsumeError::Create)?;
        Ok(EventConsumer {
            consumer,
            topics: settings.event_topics.clone(),
        })
    }

    /// Topics whose partition p is assigned and revoked with input partition p (the
    /// retry topics). Set before [`subscribe`](Self::subscribe).
    pub fn set_companions(&self, companions: Vec<String>) {
        *self.consumer.context().companions.lock().expect("companions lock") = companions;
    }

    pub fn subscribe(&self) -> Result<(), ConsumeError> {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(|source| ConsumeError::Subscribe {
                topics: self.topics.clone(),
                source,
            })
    }

    /// The next record. Also drives rebalance, commit and statistics callbacks, so it
    /// must keep being polled even while every partition is paused.
    pub async fn recv(&self) -> Result<InboundRecord, ConsumeError> {
        self.consumer
            .recv()
            .await
            .map(|message| InboundRecord::from_message(&message))
            .map_err(ConsumeError::Receive)
    }

    /// Stores `next_offset` (the first offset *not* yet finished) for the next commit.
    /// A partition revoked meanwhile answers `_STATE`: the new owner redoes the rest.
    pub fn store_offset(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut list = TopicPartitionList::new();
        if let Err(error) = list.add_partition_offset(topic, partition, Offset::Offset(next_offset)) {
            tracing::warn!(topic, partition, error = %error, "Cannot build offset list.");
            return;
        }
        match self.consumer.store_offsets(&list) {
            Ok(()) => {}
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
                tracing::debug!(
                    topic,
                    partition,
                    next_offset,
                    "Offset not stored: partition no longer assigned."
                );
            }
            Err(error) => tracing::warn!(topic, partition, next_offset, error = %error, "Cannot store offset."),
        }
    }

    /// Pauses every assigned partition: librdkafka stops fetching, recv keeps serving callbacks.
    pub fn pause_all(&self) {
        match self.consumer.assignment() {
            Ok(assignment) => {
                if let Err(error) = self.consumer.pause(&assignment) {
                    tracing::warn!(error = %error, "Cannot pause partitions.");
                }
            }
            Err(error) => tracing::warn!(error = %error, "Cannot read assignment to pause."),
        }
    }

    /// Pauses (or resumes) the assigned partitions of `topic` only.
    pub fn set_topic_paused(&self, topic: &str, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut list = TopicPartitionList::new();
        for element in assignment.elements().iter().filter(|element| element.topic() == topic) {
            list.add_partition(topic, element.partition());
        }
        if list.count() == 0 {
            return;
        }
        let result = if paused {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        if let Err(error) = result {
            tracing::warn!(topic, paused, error = %error, "Cannot pause or resume partitions.");
        }
    }

    pub fn resume_all(&self) {
        match self.consumer.assignment() {
            Ok(assignment) => {
                if let Err(error) = self.consumer.resume(&assignment) {
                    tracing::warn!(error = %error, "Cannot resume partitions.");
                }
            }
            Err(error) => tracing::warn!(error = %error, "Cannot read assignment to resume."),
        }
    }

    /// Commits every stored offset now, waiting for the coordinator's answer.
    pub fn commit_stored(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => tracing::warn!(error = %error, "Final offset commit failed."),
        }
    }

    /// Leaves the group, committing stored offsets on the way (auto-commit on close).
    pub fn close(self) {
        self.commit_stored();
        self.consumer.unsubscribe();
        // Dropping runs rd_kafka_consumer_close, which leaves the group.
        drop(self.consumer);
    }
}
