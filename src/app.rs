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
use crate::metrics::Metrics;
use crate::pipeline::assignments::{AssignmentListener, Assignments};
use crate::pipeline::offsets::OffsetTracker;
use crate::pipeline::process::Worker;
use crate::pipeline::router::Router;
use crate::pipeline::wedge::{WedgeObserver, WedgeWatch};
use crate::pipeline::Pipeline;
use crate::settings::{Problem, Settings, SettingsError};
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
    producer: EventProducer,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    admin_listener: TcpListener,
    wedge_watch: WedgeWatch,
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
        });
        let pipeline = Pipeline {
            consumer,
            worker,
            assignments,
            partition_events,
            metrics: metrics.clone(),
            max_in_flight: settings.pipeline.max_in_flight,
            max_buffered_events: settings.pipeline.max_buffered_events,
            shutdown_grace: settings.pipeline.shutdown_grace,
            ordering: settings.pipeline.ordering,
        };
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
            producer,
            metrics,
            readiness,
            admin_listener,
            wedge_watch,
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
            producer,
            metrics,
            readiness,
            admin_listener,
            wedge_watch,
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
        // A state-topic problem stops the pipeline through this child token.
        let pipeline_shutdown = shutdown.child_token();
        let mut config_check = None;
        if let Some((state, input, dead_letters)) = state {
            retry_until_checked(&shutdown, || state.check_partitions(&input)).await?;
            // The topic's configs are checked while the consumer joins its group: Kafka
            // answers in milliseconds, long before the first assignment, but a broker
            // that cannot describe configs would hold start-up for a request timeout.
            let stop = pipeline_shutdown.clone();
            let until = shutdown.clone();
            config_check = Some(tokio::spawn(async move {
                let checked = retry_until_checked(&until, || state.check_configs(&dead_letters)).await;
                if let Err(error) = &checked {
                    tracing::error!(error = %error, "The state topic cannot hold the provisioning state; stopping.");
                    stop.cancel();
                }
                checked
            }));
        }
        pipeline.consumer.subscribe()?;
        let pipeline_result = pipeline.run(pipeline_shutdown.clone()).await;
        let state_problem = match config_check {
            Some(check) if pipeline_shutdown.is_cancelled() && !shutdown.is_cancelled() => check.await.ok(),
            Some(check) => {
                check.abort();
                None
            }
            None => None,
        };
        readiness.set_consumer_assigned(false);
        connection_check.abort();
        // Watched through the drain (a drain stuck on a wedged event shows), stopped with it.
        wedge_shutdown.cancel();
        let _ = wedge_task.await;
        admin_shutdown.cancel();
        if let Ok(Err(error)) = admin_task.await {
            tracing::warn!(error = %error, "Admin server stopped with an error.");
        }
        tracing::info!("Stopped.");
        if let Some(Err(error)) = state_problem {
            return Err(error);
        }
        pipeline_result?;
        Ok(())
    }
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
