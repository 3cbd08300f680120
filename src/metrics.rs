//! Every metric the service exports, declared in one place.
//!
//! Names follow `provisioner_<name>_<unit>[_total]`. Label values come from closed
//! sets (event types, outcomes, reason codes) or from configuration (connector names,
//! topics), never from event content, so cardinality is bounded by construction.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets from 1 ms to 5 min: target calls are tens of ms, retries can take minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    /// Events read from Kafka, by CloudEvents type (`invalid` when undecodable).
    pub events_consumed: IntCounterVec,
    /// Events finished, by overall status.
    pub events_completed: IntCounterVec,
    /// Connector results, by connector and outcome.
    pub connector_results: IntCounterVec,
    /// Every call made to a target, retries included.
    pub connector_attempts: IntCounterVec,
    /// Calls that were retries, by connector and error kind.
    pub connector_retries: IntCounterVec,
    /// Duration of one call to a target.
    pub connector_request_duration: HistogramVec,
    /// From the event's arrival to its complete result being durable.
    pub event_duration: HistogramVec,
    /// From the event's arrival to its blocking reply being durable.
    pub reply_duration: HistogramVec,
    /// Events being worked on now.
    pub events_in_flight: IntGauge,
    /// Events held in memory (in flight plus queued behind the same user).
    pub events_buffered: IntGauge,
    /// 1 while fetching is paused for back-pressure.
    pub consumer_paused: IntGauge,
    /// Dead letters written, by reason code.
    pub dead_letters: IntCounterVec,
    /// Replies that could not be produced.
    pub reply_publish_failures: IntCounter,
    /// `reply_to` headers refused because the topic is not allow-listed.
    pub replies_refused: IntCounter,
    /// Failed produces (after librdkafka's own retries), by destination kind.
    pub produce_failures: IntCounterVec,
    /// Consumer lag per assigned partition, from librdkafka statistics.
    pub consumer_lag: IntGaugeVec,
    /// Offsets committed to the group coordinator, by outcome.
    pub offset_commits: IntCounterVec,
    /// Partitions assigned to this instance.
    pub assigned_partitions: IntGauge,
    /// Per assigned partition: how long its oldest unfinished offset has been the oldest
    /// (0 when nothing read is unfinished). The stored offset waits for it.
    pub partition_oldest_unfinished_age: GaugeVec,
    /// Per assigned partition: 1 while it is wedged (its oldest unfinished offset has
    /// not moved for `pipeline.wedge_after`), else 0.
    pub partition_wedged: IntGaugeVec,
    /// Wedged partitions on this instance; `/readyz` fails while it is above 0.
    pub partitions_wedged: IntGauge,
    /// Circuit breaker per connector: 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGaugeVec,
    /// Salesforce API calls used in the org's rolling 24-hour allocation (`Sforce-Limit-Info`).
    pub salesforce_api_usage: GaugeVec,
    /// That allocation.
    pub salesforce_api_limit: GaugeVec,
    /// Events not applied because a newer one already was, by connector.
    pub stale_events: IntCounterVec,
    /// 1 while a connector parks its new work in its retry topic.
    pub connector_parking: IntGaugeVec,
    /// Operations a connector holds in memory (running or waiting in its lanes).
    pub connector_held_operations: IntGaugeVec,
    /// Operations written to a connector's retry topic.
    pub operations_parked: IntCounterVec,
    /// Parked operations read back and finished, by how they ended.
    pub operations_drained: IntCounterVec,
    /// Operations stopped because their partition was revoked (the new owner redoes them).
    pub operations_revoked: IntCounterVec,
    /// Membership records a group's event wrote to the membership topic.
    pub memberships_emitted: IntCounterVec,
    /// Memberships waiting in memory for their member's create on the connector.
    pub memberships_waiting: IntGauge,
    /// Membership requests sent to a target (each carries one batch of members).
    pub membership_requests: IntCounterVec,
    /// Members per membership request.
    pub membership_batch_size: HistogramVec,
    /// User events found on a partition other than `groups.user_partitioner` gives.
    pub partitioner_mismatches: IntCounter,
    /// Blocking replies that reported a binding `queued` because it had not finished by
    /// the reply deadline.
    pub replies_past_deadline: IntCounter,
    /// State records written (to the state topic, then the local store).
    pub state_writes: IntCounter,
    /// State records that could not be decoded (logged with their key and ignored).
    pub state_records_ignored: IntCounter,
    /// Time to restore one partition's state from the state topic.
    pub state_restore_duration: HistogramVec,
    /// Records read back from the state topic by restores.
    pub state_records_restored: IntCounter,
    /// Records in the local store.
    pub state_store_records: IntGauge,
    /// The local store's size on disk.
    pub state_store_bytes: IntGauge,
    /// Constant 1, labelled with the version.
    pub build_info: GaugeVec,
    /// Seconds since the Unix epoch when the process started.
    pub start_time: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
                .expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };

        let metrics = Metrics {
            connector_parking: gauge_vec(
                "provisioner_connector_parking",
                "1 while the connector parks its new work in its retry topic (its target cannot keep up).",
                &["connector"],
            ),
            connector_held_operations: gauge_vec(
                "provisioner_connector_held_operations",
                "Operations the connector holds in memory, running or waiting in their (user, connector) lanes.",
                &["connector"],
            ),
            operations_parked: counter_vec(
                "provisioner_operations_parked_total",
                "Operations written to the connector's retry topic.",
                &["connector"],
            ),
            operations_drained: counter_vec(
                "provisioner_operations_drained_total",
                "Parked operations read back from the retry topic and finished, by result (applied, stale, failed).",
                &["connector", "result"],
            ),
            operations_revoked: counter_vec(
                "provisioner_operations_revoked_total",
                "Operations stopped without a further attempt because their partition was revoked; the partition's new owner redoes them.",
                &["connector"],
            ),
            memberships_emitted: counter_vec(
                "provisioner_memberships_emitted_total",
                "Membership records written by group events, each applied in its member's lane.",
                &["connector", "action"],
            ),
            memberships_waiting: gauge(
                "provisioner_memberships_waiting",
                "Memberships waiting (in memory, bounded by groups.max_waiting_memberships) for their member's account on the connector.",
            ),
            membership_requests: counter_vec(
                "provisioner_membership_requests_total",
                "Membership requests sent to a target; each carries a batch of members of one group.",
                &["connector", "action"],
            ),
            membership_batch_size: {
                let metric = HistogramVec::new(
                    HistogramOpts::new(
                        "provisioner_membership_batch_size",
                        "Members carried by one membership request.",
                    )
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0]),
                    &["connector"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            partitioner_mismatches: counter(
                "provisioner_partitioner_mismatches_total",
                "User events on a partition other than the one groups.user_partitioner gives their key (their memberships would be applied elsewhere).",
            ),
            replies_past_deadline: counter(
                "provisioner_replies_past_deadline_total",
                "Blocking replies sent at the reply deadline with unfinished bindings reported as queued.",
            ),
            stale_events: counter_vec(
                "provisioner_stale_events_total",
                "Events not applied to a connector because a newer event for the user already was.",
                &["connector"],
            ),
            state_writes: counter(
                "provisioner_state_writes_total",
                "Provisioning-state records written to the state topic.",
            ),
            state_records_ignored: counter(
                "provisioner_state_records_ignored_total",
                "Provisioning-state records that could not be decoded and were ignored.",
            ),
            state_restore_duration: histogram_vec(
                "provisioner_state_restore_duration_seconds",
                "Time to restore one partition's provisioning state from the state topic.",
                &["result"],
            ),
            state_records_restored: counter(
                "provisioner_state_records_restored_total",
                "Records read back from the state topic by restores.",
            ),
            state_store_records: gauge("provisioner_state_store_records", "Records in the local state store."),
            state_store_bytes: gauge(
                "provisioner_state_store_bytes",
                "Size of the local state store on disk.",
            ),
            events_consumed: counter_vec(
                "provisioner_events_consumed_total",
                "Events read from Kafka, by CloudEvents type (invalid when undecodable).",
                &["type"],
            ),
            events_completed: counter_vec(
                "provisioner_events_completed_total",
                "Events whose complete result is durable, by status.",
                &["status"],
            ),
            connector_results: counter_vec(
                "provisioner_connector_results_total",
                "Per-connector results, by outcome.",
                &["connector", "outcome"],
            ),
            connector_attempts: counter_vec(
                "provisioner_connector_attempts_total",
                "Calls made to a target, retries included.",
                &["connector"],
            ),
            connector_retries: counter_vec(
                "provisioner_connector_retries_total",
                "Retried calls, by the error kind that caused the retry.",
                &["connector", "kind"],
            ),
            connector_request_duration: histogram_vec(
                "provisioner_connector_request_duration_seconds",
                "Duration of one call to a target.",
                &["connector", "operation"],
            ),
            event_duration: histogram_vec(
                "provisioner_event_duration_seconds",
                "From an event's arrival to its complete result being durable.",
                &["status"],
            ),
            reply_duration: histogram_vec(
                "provisioner_reply_duration_seconds",
                "From an event's arrival to its blocking reply being durable.",
                &["status"],
            ),
            events_in_flight: gauge("provisioner_events_in_flight", "Events being worked on now."),
            events_buffered: gauge(
                "provisioner_events_buffered",
                "Events held in memory: in flight plus queued behind the same user.",
            ),
            consumer_paused: gauge(
                "provisioner_consumer_paused",
                "1 while back-pressure holds fetching (the uncommitted window is full: reading stops, and partitions are paused after a second).",
            ),
            dead_letters: counter_vec(
                "provisioner_dead_letters_total",
                "Dead letters written, by reason code.",
                &["reason"],
            ),
            reply_publish_failures: counter(
                "provisioner_reply_publish_failures_total",
                "Replies to blocking callers that could not be produced.",
            ),
            replies_refused: counter(
                "provisioner_replies_refused_total",
                "reply_to headers refused because the topic is not allow-listed.",
            ),
            produce_failures: counter_vec(
                "provisioner_produce_failures_total",
                "Produces that failed after librdkafka's own retries, by destination.",
                &["destination"],
            ),
            consumer_lag: {
                let metric = IntGaugeVec::new(
                    Opts::new(
                        "provisioner_consumer_lag",
                        "Messages not yet finished: the partition's end minus the stored (finished) offset.",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            offset_commits: counter_vec(
                "provisioner_offset_commits_total",
                "Offset commits to the group coordinator, by result.",
                &["result"],
            ),
            assigned_partitions: gauge(
                "provisioner_assigned_partitions",
                "Partitions currently assigned to this instance.",
            ),
            partition_oldest_unfinished_age: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "provisioner_partition_oldest_unfinished_age_seconds",
                        "Per assigned partition: how long its oldest unfinished offset has been the oldest (0 when idle).",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            partition_wedged: {
                let metric = IntGaugeVec::new(
                    Opts::new(
                        "provisioner_partition_wedged",
                        "Per assigned partition: 1 while its oldest unfinished offset has not moved for pipeline.wedge_after.",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            partitions_wedged: gauge(
                "provisioner_partitions_wedged",
                "Wedged partitions on this instance; /readyz fails while above 0.",
            ),
            circuit_state: {
                let metric = IntGaugeVec::new(
                    Opts::new(
                        "provisioner_circuit_state",
                        "Circuit breaker per connector: 0 closed, 1 open (calls held), 2 half-open (probing).",
                    ),
                    &["connector"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            salesforce_api_usage: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "provisioner_salesforce_api_usage",
                        "Salesforce API calls used in the org's 24-hour allocation (Sforce-Limit-Info).",
                    ),
                    &["connector"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            salesforce_api_limit: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "provisioner_salesforce_api_limit",
                        "The org's 24-hour Salesforce API allocation (Sforce-Limit-Info).",
                    ),
                    &["connector"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            build_info: {
                let metric = GaugeVec::new(
                    Opts::new("provisioner_build_info", "Constant 1, labelled with the version."),
                    &["version"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            start_time: {
                let metric = Gauge::new(
                    "provisioner_start_time_seconds",
                    "Seconds since the Unix epoch when the process started.",
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        metrics.start_time.set(chrono::Utc::now().timestamp() as f64);
        metrics
    }

    /// Creates the known label combinations at zero, so dashboards and `rate()` see a
    /// series before its first event (Prometheus' advice for known label sets).
    pub fn initialise_labels<'a>(&self, connectors: impl IntoIterator<Item = &'a str>) {
        for event_type in crate::event::EventType::ALL {
            self.events_consumed.with_label_values(&[event_type.as_str()]);
        }
        self.events_consumed.with_label_values(&["invalid"]);
        for status in ["succeeded", "failed", "partial", "skipped"] {
            // `queued` is never a complete result's status.
            self.events_completed.with_label_values(&[status]);
        }
        for reason in crate::event::DecodeError::REASONS.iter().chain(&[
            crate::dead_letter::CONNECTOR_FAILED_REASON,
            crate::dead_letter::INTERNAL_ERROR_REASON,
        ]) {
            self.dead_letters.with_label_values(&[reason]);
        }
        for destination in ["reply", "result", "dead_letter"] {
            self.produce_failures.with_label_values(&[destination]);
        }
        for result in ["ok", "error"] {
            self.offset_commits.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            self.state_restore_duration.with_label_values(&[result]);
        }
        for connector in connectors {
            self.connector_attempts.with_label_values(&[connector]);
            self.stale_events.with_label_values(&[connector]);
            self.connector_parking.with_label_values(&[connector]);
            self.connector_held_operations.with_label_values(&[connector]);
            self.operations_parked.with_label_values(&[connector]);
            self.operations_revoked.with_label_values(&[connector]);
            for action in ["add", "remove"] {
                self.memberships_emitted.with_label_values(&[connector, action]);
                self.membership_requests.with_label_values(&[connector, action]);
            }
            for result in ["applied", "stale", "failed"] {
                self.operations_drained.with_label_values(&[connector, result]);
            }
            for outcome in crate::result::Outcome::ALL {
                self.connector_results.with_label_values(&[connector, outcome.as_str()]);
            }
            for kind in crate::result::ErrorKind::RETRYABLE {
                self.connector_retries.with_label_values(&[connector, kind.as_str()]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text encoder writes UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_renders_with_its_prefix() {
        let metrics = Metrics::new();
        metrics.events_consumed.with_label_values(&["user.created"]).inc();
        let text = metrics.render();
        assert!(text.contains("provisioner_events_consumed_total{type=\"user.created\"} 1"));
        assert!(text.contains("provisioner_build_info{version="));
        for line in text.lines().filter(|line| line.starts_with("# TYPE")) {
            assert!(line.starts_with("# TYPE provisioner_"), "unprefixed metric: {line}");
        }
    }
}
