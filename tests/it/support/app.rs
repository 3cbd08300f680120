//! Running the real service in-process against the test broker, and reading its output.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use provisioner::app::Application;
use provisioner::connectors::{Connector, ConnectorSet};
use provisioner::metrics::Metrics;
use provisioner::result::ProvisioningResult;
use provisioner::settings::Settings;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::broker::{broker, Broker};
use crate::support::unique_topic;

/// Topic and group names unique to one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub events: String,
    pub results: String,
    pub replies: String,
    pub dead_letters: String,
    pub state: String,
    /// The retry topics' prefix (`parking.topic_prefix`).
    pub retry_prefix: String,
    /// `groups.membership_topic`.
    pub memberships: String,
    /// The local state store of a service *process* started with these names
    /// (in-process apps get a directory of their own each, see [`TestApp`]).
    pub state_dir: Arc<tempfile::TempDir>,
    pub group: String,
}

impl Names {
    pub fn new(test: &str) -> Names {
        Names {
            events: unique_topic(&format!("{test}-events")),
            results: unique_topic(&format!("{test}-results")),
            replies: unique_topic(&format!("{test}-replies")),
            dead_letters: unique_topic(&format!("{test}-dlq")),
            state: unique_topic(&format!("{test}-state")),
            retry_prefix: format!("{}.", unique_topic(&format!("{test}-retry"))),
            memberships: unique_topic(&format!("{test}-memberships")),
            state_dir: Arc::new(
                tempfile::Builder::new()
                    .prefix("provisioner-test-state-")
                    .tempdir()
                    .expect("a temporary directory"),
            ),
            group: unique_topic(&format!("{test}-group")),
        }
    }

    /// Creates the topics on the shared broker; the event topic gets `partitions`
    /// partitions, and so does the (compacted) state topic.
    pub async fn create(&self, partitions: i32) {
        self.create_on(broker(), partitions).await;
    }

    /// Creates the topics on `broker`.
    pub async fn create_on(&self, broker: &Broker, partitions: i32) {
        broker.create_topics(&[&self.events], partitions).await;
        broker
            .create_topics_with(&[&self.state], partitions, &[("cleanup.policy", "compact")])
            .await;
        broker
            .create_topics(&[&self.results, &self.replies, &self.dead_letters], 1)
            .await;
    }

    /// The `[kafka]` section (and admin on a free port), ready for more TOML after it.
    pub fn kafka_toml(&self) -> String {
        format!(
            r#"
            [kafka]
            bootstrap_servers = "{bootstrap}"
            group_id = "{group}"
            event_topics = ["{events}"]
            results_topic = "{results}"
            reply_topic = "{replies}"
            dead_letter_topic = "{dead_letters}"
            commit_interval = "100ms"
            produce_timeout = "10s"

            [state]
            topic = "{state}"
            dir = "{state_dir}"

            [parking]
            topic_prefix = "{retry_prefix}"

            [groups]
            membership_topic = "{memberships}"
            # The tests publish with librdkafka's default partitioner.
            user_partitioner = "crc32"

            [admin]
            listen = "127.0.0.1:0"
            "#,
            bootstrap = broker().bootstrap_servers,
            group = self.group,
            events = self.events,
            results = self.results,
            replies = self.replies,
            dead_letters = self.dead_letters,
            state = self.state,
            retry_prefix = self.retry_prefix,
            memberships = self.memberships,
            state_dir = self.state_dir.path().display(),
        )
    }
}

/// The service in-process. Each one gets a local state directory of its own (two
/// instances in one test cannot share one; a restarted one starts empty and restores
/// from the state topic, as a new pod would).
pub struct TestApp {
    #[allow(dead_code)]
    pub admin_address: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    _state_dir: tempfile::TempDir,
}

fn own_state_dir(settings: &mut Settings) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("provisioner-app-state-")
        .tempdir()
        .expect("a temporary directory");
    settings.state.dir = dir.path().to_path_buf();
    dir
}

impl TestApp {
    /// Starts the service with `connectors` standing in for the configured targets.
    pub async fn spawn(mut settings: Settings, connectors: Vec<(&str, Arc<dyn Connector>)>) -> TestApp {
        let state_dir = own_state_dir(&mut settings);
        let mut set = ConnectorSet::default();
        for (name, connector) in connectors {
            let delivery = settings
                .connectors
                .get(name)
                .map(|connector| connector.delivery().clone())
                .unwrap_or_default();
            set.insert(name, connector, &delivery);
        }
        let application = Application::build_with_connectors(settings, set)
            .await
            .expect("service builds");
        Self::run(application, state_dir)
    }

    /// Starts the service with the connectors its settings configure (real targets;
    /// the fault tests point them at the emulators, hence the feature).
    #[cfg(feature = "devtools")]
    pub async fn spawn_configured(mut settings: Settings) -> TestApp {
        let state_dir = own_state_dir(&mut settings);
        let application = Application::build(settings).await.expect("service builds");
        Self::run(application, state_dir)
    }

    fn run(application: Application, state_dir: tempfile::TempDir) -> TestApp {
        let admin_address = application.admin_address();
        let metrics = application.metrics();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            application.run_until_stopped(token).await.expect("service runs");
        });
        TestApp {
            admin_address,
            metrics,
            shutdown,
            task,
            _state_dir: state_dir,
        }
    }

    /// SIGTERM, in-process: drain, commit, stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("service stops within 60 s")
            .expect("service task did not panic");
    }

    /// An abrupt stop: the service is dropped wherever it is, with no drain.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

pub fn producer() -> FutureProducer {
    broker()
        .client_config()
        .set("linger.ms", "0")
        .create()
        .expect("test producer")
}

/// Publishes one record and waits for the broker's acknowledgement.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    value: &[u8],
    headers: &[(&str, &str)],
) {
    let headers = headers.iter().fold(OwnedHeaders::new(), |headers, (name, value)| {
        headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        })
    });
    let mut record = FutureRecord::to(topic).payload(value).headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Timeout::After(Duration::from_secs(10)))
        .await
        .map_err(|(error, _)| error)
        .expect("test publish acknowledged");
}

/// One record read back from an output topic.
#[derive(Debug, Clone)]
pub struct OutputRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl OutputRecord {
    pub fn result(&self) -> ProvisioningResult {
        serde_json::from_slice(&self.value).expect("a ProvisioningResult")
    }
}

/// Reads a whole topic from the start, without a consumer group.
pub struct TopicReader {
    consumer: StreamConsumer,
    pub records: Vec<OutputRecord>,
}

impl TopicReader {
    pub fn new(topic: &str, partitions: i32) -> TopicReader {
        TopicReader::on(broker(), topic, partitions)
    }

    /// Reads `topic` on a broker other than the shared one.
    pub fn on(broker: &Broker, topic: &str, partitions: i32) -> TopicReader {
        let consumer: StreamConsumer = broker
            .client_config()
            .set("group.id", unique_topic("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        TopicReader {
            consumer,
            records: Vec::new(),
        }
    }

    /// Reads until the result of `event_id` has arrived; returns the last one read for it
    /// (a redelivered event may have several). Its users need the emulators.
    #[cfg_attr(not(feature = "devtools"), allow(dead_code))]
    pub async fn result_of(&mut self, event_id: &str, timeout: Duration) -> ProvisioningResult {
        self.read_until(&format!("the result of {event_id}"), timeout, |records| {
            records.iter().any(|record| record.result().event_id == event_id)
        })
        .await;
        self.records
            .iter()
            .map(OutputRecord::result)
            .rfind(|result| result.event_id == event_id)
            .expect("read until it arrived")
    }

    /// Reads until `done(records)` holds, or panics after `timeout`.
    pub async fn read_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[OutputRecord]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.records) {
            let message = tokio::time::timeout_at(deadline, self.consumer.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; have {} records",
                        self.records.len()
                    )
                })
                .expect("reader error");
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            (
                                header.key.to_string(),
                                String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.records.push(OutputRecord {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(|key| String::from_utf8_lossy(key).into_owned()),
                value: message.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
}

/// The group's committed offset for each partition of `topic` (-1001 when none).
pub fn committed_offsets(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = broker()
        .client_config()
        .set("group.id", group)
        .create()
        .expect("offset reader");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|partition| {
            match committed
                .find_partition(topic, partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset,
                _ => -1001,
            }
        })
        .collect()
}

/// How many records `topic` holds (sum of high watermarks), read from the broker.
pub fn record_count(topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = broker().client_config().create().expect("watermark reader");
    (0..partitions)
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks");
            high - low
        })
        .sum()
}
