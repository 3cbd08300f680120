//! Wiring: settings in, a running service out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::connectors::{BuildError, ConnectorSet};
use crate::kafka::consumer::{AssignmentObserver, ConsumeError, EventConsumer};
use crate::kafka::producer::{EventProducer, ProduceError};
use crate::kafka::settings::KafkaSettings;
use crate::metrics::Metrics;
use crate::pipeline::assignments::{AssignmentListener, Assignments};
use crate::pipeline::offsets::OffsetTracker;
use crate::pipeline::parking::{self, ParkingError, ParkingMonitor};
use crate::pipeline::process::{Parking, Worker};
use crate::pipeline::router::Router;
use crate::pipeline::Pipeline;
use crate::settings::{ParkingSettings, Problem, Settings, SettingsError};
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
    producer: EventProducer,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    admin_listener: TcpListener,
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
        };
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
            producer,
            metrics,
            readiness,
            admin_listener,
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
            producer,
            metrics,
            readiness,
            admin_listener,
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
        if let Some(plan) = retry_topics {
            let prepared = loop {
                match parking::prepare_retry_topics(&plan.kafka, &plan.settings, &plan.connectors, &plan.input).await {
                    Ok(prepared) => break Some(prepared),
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(error = %error, "Cannot prepare the retry topics yet; retrying.");
                    }
                    Err(error) => return Err(error.into()),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break None,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            };
            if let Some(topics) = prepared {
                pipeline.consumer.set_companions(topics.names());
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
                });
            }
        }
        pipeline.consumer.subscribe()?;
        let pipeline_result = pipeline.run(pipeline_shutdown.clone()).await;
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
