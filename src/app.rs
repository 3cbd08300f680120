//! Wiring: settings in, a running service out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::connectors::{BuildError, ConnectorSet};
use crate::kafka::consumer::{AssignmentObserver, ConsumeError, EventConsumer};
use crate::kafka::producer::{self, EventProducer, ProduceError};
use crate::kafka::settings::KafkaSettings;
use crate::kafka::state_topic;
use crate::metrics::Metrics;
use crate::pipeline::assignments::{AssignmentListener, Assignments};
use crate::pipeline::groups::{self, GroupsError};
use crate::pipeline::offsets::OffsetTracker;
use crate::pipeline::parking::{self, ParkingError, ParkingMonitor};
use crate::pipeline::router::Router;
use crate::pipeline::wedge::{WedgeObserver, WedgeWatch};
use crate::pipeline::worker::{Parking, Worker};
use crate::pipeline::Pipeline;
use crate::settings::{GroupsSettings, ParkingSettings, Problem, Settings, SettingsError};
use crate::state::{ProvisioningState, StateError};

/// Why the service could not start. All of these are permanent: the process exits.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Connectors(#[from] BuildError),
    #[error(transparent)]
    Consumer(#[from] ConsumeError),
    #[error(transparent)]
    Producer(#[from] ProduceError),
    #[error("provisioning state: {0}")]
    State(#[from] StateError),
    #[error("parking: {0}")]
    Parking(#[from] ParkingError),
    #[error("groups: {0}")]
    Groups(#[from] GroupsError),
    #[error("cannot bind the admin server to {address}: {source}")]
    AdminBind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct Application {
    pipeline: Pipeline,
    /// With the topics it must check before consuming: (input, dead letters).
    state: Option<(Arc<ProvisioningState>, String, String)>,
    /// What start-up needs to prepare the retry topics, when parking is on.
    retry_topics: Option<RetryTopicPlan>,
    membership_topic: Option<MembershipPlan>,
    producer: EventProducer,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    admin_listener: TcpListener,
    wedge_watch: WedgeWatch,
    /// For the start-up check of dead-letter sizes.
    kafka: KafkaSettings,
    max_event_bytes: usize,
}

impl Application {
    /// Builds the service with the connectors its settings describe.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let connectors = ConnectorSet::from_settings(&settings.connectors, &metrics)?;
        Self::build_with(settings, connectors, metrics).await
    }

    /// Builds the service with the given connectors (tests plug in doubles here).
    pub async fn build_with_connectors(
        settings: Settings,
        connectors: ConnectorSet,
    ) -> Result<Application, StartupError> {
        Self::build_with(settings, connectors, Arc::new(Metrics::new())).await
    }

    async fn build_with(
        settings: Settings,
        connectors: ConnectorSet,
        metrics: Arc<Metrics>,
    ) -> Result<Application, StartupError> {
        let router = Router::new(&settings).map_err(invalid)?;
        metrics.initialise_labels(connectors.names());
        let readiness = Arc::new(Readiness::default());
        let tracker = Arc::new(OffsetTracker::default());
        let state = if settings.state.enabled {
            Some(Arc::new(ProvisioningState::open(
                &settings.state,
                &settings.kafka,
                metrics.clone(),
            )?))
        } else {
            None
        };
        // A revoke waits for calls on the wire at most as long as the slowest
        // connector's request timeout.
        let revoke_wait = settings
            .connectors
            .values()
            .map(|connector| connector.http().request_timeout)
            .max()
            .unwrap_or(Duration::from_secs(10));
        let wedge_watch = WedgeWatch::new(
            tracker.clone(),
            metrics.clone(),
            readiness.clone(),
            settings.pipeline.wedge_after,
            settings.kafka.event_topics.clone(),
        );
        let (assignments, partition_events) = Assignments::new(tracker, state.clone(), revoke_wait);
        let producer = EventProducer::new(&settings.kafka)?;
        let consumer = EventConsumer::new(
            &settings.kafka,
            metrics.clone(),
            readiness.clone(),
            Arc::new(AssignmentListener(assignments.clone())),
        )?;
        let admin_listener = admin::bind(settings.admin.listen)
            .await
            .map_err(|source| StartupError::AdminBind {
                address: settings.admin.listen,
                source,
            })?;
        let worker = Arc::new(Worker {
            producer: producer.clone(),
            router,
            connectors,
            metrics: metrics.clone(),
            results_topic: settings.kafka.results_topic.clone(),
            dead_letter_topic: settings.kafka.dead_letter_topic.clone(),
            reply_topic_allow_list: settings.reply_topic_allow_list(),
            max_event_bytes: settings.pipeline.max_event_bytes,
            state: state.clone(),
            assignments: assignments.clone(),
            parking: std::sync::OnceLock::new(),
            groups: std::sync::OnceLock::new(),
        });
        // Parking needs the state: it records which lanes are parked.
        let parking_enabled = settings.parking.enabled && state.is_some();
        let parking = ParkingMonitor::new(
            &settings.parking,
            settings.parking.held_bound(settings.pipeline.max_buffered_events),
            parking_enabled,
            metrics.clone(),
        );
        let pipeline = Pipeline {
            consumer,
            worker,
            assignments,
            partition_events,
            metrics: metrics.clone(),
            max_in_flight: settings.pipeline.max_in_flight,
            max_buffered_events: settings.pipeline.max_buffered_events,
            shutdown_grace: settings.pipeline.shutdown_grace,
            reply_deadline: settings.pipeline.reply_deadline,
            ordering: settings.pipeline.ordering,
            parking,
            max_waiting: settings.groups.waiting_bound(settings.pipeline.max_buffered_events),
        };
        // Memberships need the state: members' remote ids and memberships' versions.
        let membership_topic = (settings.groups.enabled && state.is_some()).then(|| MembershipPlan {
            settings: settings.groups.clone(),
            kafka: settings.kafka.clone(),
            input: settings.kafka.event_topics[0].clone(),
        });
        let retry_topics = parking_enabled.then(|| RetryTopicPlan {
            settings: settings.parking.clone(),
            kafka: settings.kafka.clone(),
            connectors: settings.connectors.keys().cloned().collect(),
            input: settings.kafka.event_topics[0].clone(),
        });
        let state = state.map(|state| {
            (
                state,
                settings.kafka.event_topics[0].clone(),
                settings.kafka.dead_letter_topic.clone(),
            )
        });
        Ok(Application {
            pipeline,
            state,
            retry_topics,
            membership_topic,
            producer,
            metrics,
            readiness,
            admin_listener,
            wedge_watch,
            kafka: settings.kafka.clone(),
            max_event_bytes: settings.pipeline.max_event_bytes,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Consumes until `shutdown` is cancelled, then drains, commits and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartupError> {
        let Application {
            pipeline,
            state,
            retry_topics,
            membership_topic,
            producer,
            metrics,
            readiness,
            admin_listener,
            wedge_watch,
            kafka,
            max_event_bytes,
        } = self;
        // The admin server outlives the drain, so probes and scrapes keep working.
        let admin_shutdown = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            metrics.clone(),
            readiness.clone(),
            admin_shutdown.clone(),
        ));
        let connection_check = tokio::spawn(wait_for_broker(producer, readiness.clone(), shutdown.clone()));
        let wedge_shutdown = CancellationToken::new();
        let wedge_task = tokio::spawn(wedge_watch.run(wedge_shutdown.clone()));
        // Warns only, so it runs beside start-up instead of holding it (a broker that
        // cannot describe configs answers only after a request timeout).
        let size_check = tokio::spawn(check_dead_letter_sizes(kafka, max_event_bytes, shutdown.clone()));
        // A state-topic problem stops the pipeline through this child token.
        let pipeline_shutdown = shutdown.child_token();
        let mut config_checks = Vec::new();
        if let Some((state, input, dead_letters)) = state {
            retry_until_checked(&shutdown, || state.check_partitions(&input)).await?;
            // The topic's configs are checked while the consumer joins its group: Kafka
            // answers in milliseconds, long before the first assignment, but a broker
            // that cannot describe configs would hold start-up for a request timeout.
            let stop = pipeline_shutdown.clone();
            let until = shutdown.clone();
            config_checks.push(tokio::spawn(async move {
                let checked = retry_until_checked(&until, || state.check_configs(&dead_letters)).await;
                if let Err(error) = &checked {
                    tracing::error!(error = %error, "The state topic cannot hold the provisioning state; stopping.");
                    stop.cancel();
                }
                checked
            }));
        }
        // Partition p of these topics goes with input partition p.
        let mut companions = Vec::new();
        if let Some(plan) = retry_topics {
            let prepared = retry_until_prepared(&shutdown, "the retry topics", || {
                parking::prepare_retry_topics(&plan.kafka, &plan.settings, &plan.connectors, &plan.input)
            })
            .await?;
            if let Some(topics) = prepared {
                companions.extend(topics.names());
                // Retention is checked while the consumer joins, like the state topic's configs.
                let stop = pipeline_shutdown.clone();
                let until = shutdown.clone();
                let names = topics.names();
                let check_plan = RetryTopicPlan { ..plan.clone() };
                config_checks.push(tokio::spawn(async move {
                    loop {
                        match parking::check_retention(&check_plan.kafka, &check_plan.settings, &names).await {
                            Ok(()) => return Ok(()),
                            Err(error) if error.is_retryable() => {
                                tracing::warn!(error = %error, "Cannot check the retry topics' retention yet; retrying.");
                            }
                            Err(error) => {
                                tracing::error!(error = %error, "A retry topic cannot hold parked work; stopping.");
                                stop.cancel();
                                return Err(StartupError::from(error));
                            }
                        }
                        tokio::select! {
                            _ = until.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                }));
                let _ = pipeline.worker.parking.set(Parking {
                    topics,
                    prefix: plan.settings.topic_prefix.clone(),
                    max_parked_time: plan.settings.max_parked_time,
                    lane_writes: Default::default(),
                });
            }
        }
        if let Some(plan) = membership_topic {
            let prepared = retry_until_prepared(&shutdown, "the membership topic", || {
                groups::prepare_membership_topic(&plan.kafka, &plan.settings, &plan.input)
            })
            .await?;
            if let Some(groups) = prepared {
                companions.push(groups.membership_topic.clone());
                let _ = pipeline.worker.groups.set(groups);
            }
        }
        pipeline.consumer.set_companions(companions);
        pipeline.consumer.subscribe()?;
        // On a worker of the runtime, not on the thread that blocks on it: the loop
        // spawns and joins a task per operation and per completion, and a wake-up
        // between workers is cheaper than one to and from a thread outside the pool.
        let pipeline_result = match tokio::spawn(pipeline.run(pipeline_shutdown.clone())).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Only a runtime shutting down cancels it, and then nothing is left to do.
            Err(_) => Ok(()),
        };
        let mut state_problem = None;
        for check in config_checks {
            if pipeline_shutdown.is_cancelled() && !shutdown.is_cancelled() {
                if let Ok(Err(error)) = check.await {
                    state_problem.get_or_insert(error);
                }
            } else {
                check.abort();
            }
        }
        readiness.set_consumer_assigned(false);
        connection_check.abort();
        size_check.abort();
        // Watched through the drain (a drain stuck on a wedged event shows), stopped with it.
        wedge_shutdown.cancel();
        let _ = wedge_task.await;
        admin_shutdown.cancel();
        if let Ok(Err(error)) = admin_task.await {
            tracing::warn!(error = %error, "Admin server stopped with an error.");
        }
        tracing::info!("Stopped.");
        if let Some(error) = state_problem {
            return Err(error);
        }
        pipeline_result?;
        Ok(())
    }
}

/// What start-up needs to prepare the membership topic.
struct MembershipPlan {
    settings: GroupsSettings,
    kafka: KafkaSettings,
    input: String,
}

/// The retry topics' start-up check, done before subscribing.
#[derive(Clone)]
struct RetryTopicPlan {
    settings: ParkingSettings,
    kafka: KafkaSettings,
    connectors: Vec<String>,
    input: String,
}

/// The consumer tells the readiness probe about its assignment through this; `kafka`
/// does not know `admin`.
impl AssignmentObserver for Readiness {
    fn set_consumer_assigned(&self, assigned: bool) {
        Readiness::set_consumer_assigned(self, assigned);
    }
}

/// The wedge watch tells the readiness probe how many partitions are wedged through
/// this; `pipeline` does not know `admin`.
impl WedgeObserver for Readiness {
    fn set_wedged_partitions(&self, wedged: usize) {
        Readiness::set_wedged_partitions(self, wedged);
    }
}

fn invalid(problems: Vec<Problem>) -> StartupError {
    StartupError::Settings(SettingsError::Invalid(problems))
}

/// Runs a state-topic check, retrying while the brokers are unreachable; a topic that
/// cannot be the state's source of truth is an error that stops the service.
async fn retry_until_checked<F, Fut>(shutdown: &CancellationToken, check: F) -> Result<(), StartupError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), StateError>>,
{
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_retryable() => {
                tracing::warn!(error = %error, "Cannot check the state topic yet; retrying.");
            }
            Err(error) => return Err(error.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// A start-up topic preparation's error: it may pass (the broker not there yet), or not.
trait PreparationError: std::fmt::Display + Into<StartupError> {
    fn is_retryable(&self) -> bool;
}

impl PreparationError for ParkingError {
    fn is_retryable(&self) -> bool {
        ParkingError::is_retryable(self)
    }
}

impl PreparationError for GroupsError {
    fn is_retryable(&self) -> bool {
        GroupsError::is_retryable(self)
    }
}

/// Runs `prepare` until it succeeds, every 2 s while its error may pass; `None` when
/// the service is stopped meanwhile.
async fn retry_until_prepared<T, E, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    prepare: F,
) -> Result<Option<T>, StartupError>
where
    E: PreparationError,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match prepare().await {
            Ok(prepared) => return Ok(Some(prepared)),
            Err(error) if error.is_retryable() => {
                tracing::warn!(error = %error, "Cannot prepare {what} yet; retrying.");
            }
            Err(error) => return Err(error.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// What a dead letter carries beyond the event's value: the event's key and headers,
/// and ours (reason, error message, source topic, partition and offset, time, origin).
/// A connector's error message is the longest of ours; 16 KiB covers them with room.
pub const DEAD_LETTER_HEADER_ALLOWANCE: usize = 16 * 1024;

/// A limit on the size of a record written to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterLimit {
    /// The limit's configuration key, as Kafka names it.
    pub key: &'static str,
    /// Whose limit it is, and where it is set.
    pub of: String,
    pub bytes: i64,
}

/// The limits that a dead letter of the largest event the service accepts
/// (`max_event_bytes`, plus [`DEAD_LETTER_HEADER_ALLOWANCE`]) would exceed. Limits that
/// could not be read are not passed in, and so never judged.
pub fn dead_letter_limits_exceeded(max_event_bytes: usize, limits: Vec<DeadLetterLimit>) -> Vec<DeadLetterLimit> {
    let largest_dead_letter = max_event_bytes.saturating_add(DEAD_LETTER_HEADER_ALLOWANCE);
    let largest_dead_letter = i64::try_from(largest_dead_letter).unwrap_or(i64::MAX);
    limits
        .into_iter()
        .filter(|limit| largest_dead_letter > limit.bytes)
        .collect()
}

/// Compares `pipeline.max_event_bytes` with the producer's `message.max.bytes` and the
/// dead-letter topic's `max.message.bytes`, and warns about each limit a dead letter of
/// an event that large would exceed.
///
/// A warning, not a start-up error: the service stays correct. A dead letter too large to
/// write is written truncated, saying so (`publish_dead_letter`), and the partition moves
/// on; only the tail of the few events near the size limit is lost from the dead-letter
/// topic. Refusing to start would turn that into an outage, and would refuse the
/// defaults themselves (1 MiB events, librdkafka's 1,000,000-byte producer limit). The
/// topic's limit also cannot always be read (a broker that cannot describe configs, an
/// account without DescribeConfigs), and start-up should not depend on that either.
async fn check_dead_letter_sizes(kafka: KafkaSettings, max_event_bytes: usize, shutdown: CancellationToken) {
    let mut limits = Vec::new();
    match producer::message_max_bytes(&kafka) {
        Some(bytes) => limits.push(DeadLetterLimit {
            key: "message.max.bytes",
            of: "the producer (librdkafka's default unless kafka.properties sets it)".into(),
            bytes,
        }),
        None => tracing::debug!("librdkafka did not say the producer's message.max.bytes."),
    }
    let topic = &kafka.dead_letter_topic;
    let facts = loop {
        match state_topic::describe_topic(&kafka, topic, true).await {
            Ok(facts) => break facts,
            Err(error) => {
                tracing::debug!(topic = %topic, error = %error, "Cannot describe the dead-letter topic yet; retrying.")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    };
    match facts {
        // A missing topic is reported where it is produced to, not here.
        None => {}
        Some(facts) => match facts.max_message_bytes {
            Some(bytes) => limits.push(DeadLetterLimit {
                key: "max.message.bytes",
                of: format!("the dead-letter topic `{topic}` (a topic config)"),
                bytes,
            }),
            None => {
                tracing::info!(topic = %topic, "The broker did not describe the dead-letter topic's configuration; cannot check its max.message.bytes against pipeline.max_event_bytes.")
            }
        },
    }
    for limit in dead_letter_limits_exceeded(max_event_bytes, limits) {
        tracing::warn!(
            max_event_bytes,
            header_allowance = DEAD_LETTER_HEADER_ALLOWANCE,
            limit_key = limit.key,
            limit_of = %limit.of,
            limit_bytes = limit.bytes,
            "pipeline.max_event_bytes = {max_event_bytes}, plus {DEAD_LETTER_HEADER_ALLOWANCE} bytes for dead-letter headers, exceeds {} = {} of {}: the dead letter of an event that large cannot be written whole and is written truncated to its first {} bytes. Lower pipeline.max_event_bytes or raise {}.",
            limit.key,
            limit.bytes,
            limit.of,
            crate::dead_letter::TRUNCATED_VALUE_BYTES,
            limit.key,
        );
    }
}

/// Marks the producer side ready once a broker answers a metadata request.
async fn wait_for_broker(producer: EventProducer, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    loop {
        let probe = producer.clone();
        let answered = tokio::task::spawn_blocking(move || probe.check_connection(Duration::from_secs(5)))
            .await
            .map(|result| result.is_ok())
            .unwrap_or(false);
        if answered {
            readiness.set_producer_connected(true);
            tracing::info!("Connected to Kafka.");
            return;
        }
        tracing::warn!("Kafka brokers not reachable yet; retrying.");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(of: &str, bytes: i64) -> DeadLetterLimit {
        DeadLetterLimit {
            key: "max.bytes",
            of: of.into(),
            bytes,
        }
    }

    /// librdkafka's producer default and Kafka's topic default.
    fn default_limits() -> Vec<DeadLetterLimit> {
        vec![limit("producer", 1_000_000), limit("topic", 1_048_588)]
    }

    #[test]
    fn the_default_event_size_exceeds_both_default_limits() {
        let exceeded = dead_letter_limits_exceeded(1024 * 1024, default_limits());
        assert_eq!(exceeded, default_limits());
    }

    #[test]
    fn an_event_size_that_leaves_room_for_the_headers_passes() {
        let largest = 1_000_000 - DEAD_LETTER_HEADER_ALLOWANCE;
        assert_eq!(dead_letter_limits_exceeded(largest, default_limits()), vec![]);
        assert_eq!(
            dead_letter_limits_exceeded(largest + 1, default_limits()),
            vec![limit("producer", 1_000_000)],
            "one byte more no longer fits the producer's limit, still fits the topic's"
        );
    }

    #[test]
    fn only_the_limits_too_small_are_reported() {
        let limits = vec![limit("producer", 3_000_000), limit("topic", 1_048_588)];
        assert_eq!(
            dead_letter_limits_exceeded(2_000_000, limits),
            vec![limit("topic", 1_048_588)]
        );
    }

    #[test]
    fn unknown_limits_are_not_judged() {
        assert_eq!(dead_letter_limits_exceeded(usize::MAX, vec![]), vec![]);
        assert_eq!(
            dead_letter_limits_exceeded(usize::MAX, vec![limit("topic", i64::MAX)]),
            vec![],
            "nothing exceeds the largest limit"
        );
    }
}
