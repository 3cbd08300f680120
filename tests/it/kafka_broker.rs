//! The test broker itself: it keeps Kafka's fetch contract, its SASL_SSL listener is real,
//! and the service survives the broker process stopping and coming back.
//!
//! The fetch-contract tests are the harness's self-test. Kafka answers a fetch at an
//! offset *inside* a record batch with the batch that *contains* it, and the client skips
//! the records before the offset. A broker that answers with the *next* batch (tansu 0.6.0
//! does) silently loses records after a seek or a pause/resume, which would hide or fake
//! bugs in the service's back-pressure and crash tests. These tests prove that the
//! records of interest sit inside multi-record batches (read with Kafka's own log dump
//! tool) and that every record from the requested offset on is delivered.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use provisioner::settings::Settings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::support::app::{publish, Names, TestApp, TopicReader};
use crate::support::broker::{broker, Broker, RecordBatch, SCRAM_USERNAME};
use crate::support::doubles::{event_json, RecordingConnector};
use crate::support::unique_topic;

const BATCHES: i64 = 5;
const RECORDS_PER_BATCH: i64 = 10;
const RECORDS: i64 = BATCHES * RECORDS_PER_BATCH;

/// A one-partition topic holding `BATCHES` record batches of `RECORDS_PER_BATCH` records
/// each, values "0", "1", …, checked with `DumpLogSegments`.
async fn topic_of_batches(prefix: &str) -> (String, Vec<RecordBatch>) {
    let topic = unique_topic(prefix);
    broker().create_topics(&[&topic], 1).await;
    // A batch is sent when it holds `batch.num.messages` records; the long linger makes
    // sure it is never sent earlier.
    let producer: FutureProducer = broker()
        .client_config()
        .set("batch.num.messages", RECORDS_PER_BATCH.to_string())
        .set("linger.ms", "30000")
        .set("enable.idempotence", "true")
        .create()
        .expect("batching producer");
    for batch in 0..BATCHES {
        let sends: Vec<_> = (0..RECORDS_PER_BATCH)
            .map(|index| {
                let value = (batch * RECORDS_PER_BATCH + index).to_string();
                let producer = producer.clone();
                let topic = topic.clone();
                async move {
                    producer
                        .send(
                            FutureRecord::<(), _>::to(&topic).payload(&value),
                            Timeout::After(Duration::from_secs(30)),
                        )
                        .await
                        .map_err(|(error, _)| error)
                        .expect("acknowledged")
                }
            })
            .collect();
        futures::future::join_all(sends).await;
    }
    let batches = broker().record_batches(&topic, 0);
    let expected: Vec<RecordBatch> = (0..BATCHES)
        .map(|batch| RecordBatch {
            base_offset: batch * RECORDS_PER_BATCH,
            last_offset: batch * RECORDS_PER_BATCH + RECORDS_PER_BATCH - 1,
            count: RECORDS_PER_BATCH,
        })
        .collect();
    assert_eq!(
        batches, expected,
        "the log must hold {BATCHES} batches of {RECORDS_PER_BATCH} records"
    );
    (topic, batches)
}

fn consumer() -> BaseConsumer {
    broker()
        .client_config()
        .set("group.id", unique_topic("contract"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer")
}

fn assign_at(consumer: &BaseConsumer, topic: &str, offset: i64) {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&assignment).expect("assign");
}

/// Polls until a record with offset `last` arrives (or 30 s pass, then panics) and returns
/// every (offset, value) seen, in delivery order; `on_record` may act on the consumer.
fn read_through(consumer: &BaseConsumer, last: i64, mut on_record: impl FnMut(&BaseConsumer, i64)) -> Vec<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for offset {last}; delivered so far: {seen:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("no consumer error");
        let value: i64 = std::str::from_utf8(message.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let offset = message.offset();
        seen.push((offset, value));
        on_record(consumer, offset);
        if offset >= last {
            return seen;
        }
    }
}

fn inside_a_batch(batches: &[RecordBatch], offset: i64) -> bool {
    batches
        .iter()
        .any(|batch| batch.base_offset < offset && offset <= batch.last_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_from_inside_a_batch_delivers_every_record_from_that_offset() {
    let (topic, batches) = topic_of_batches("contract-assign").await;
    let start = 2 * RECORDS_PER_BATCH + RECORDS_PER_BATCH / 2;
    assert!(inside_a_batch(&batches, start));

    let consumer = consumer();
    assign_at(&consumer, &topic, start);
    let seen = read_through(&consumer, RECORDS - 1, |_, _| {});
    let expected: Vec<(i64, i64)> = (start..RECORDS).map(|offset| (offset, offset)).collect();
    assert_eq!(seen, expected, "assigned at offset {start}, inside batch {batches:?}");

    // A seek backwards into the middle of another batch does the same.
    let again = RECORDS_PER_BATCH + 3;
    assert!(inside_a_batch(&batches, again));
    consumer
        .seek(&topic, 0, Offset::Offset(again), Duration::from_secs(10))
        .expect("seek");
    let seen = read_through(&consumer, RECORDS - 1, |_, _| {});
    let expected: Vec<(i64, i64)> = (again..RECORDS).map(|offset| (offset, offset)).collect();
    assert_eq!(seen, expected, "after a seek to offset {again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_resume_in_the_middle_of_a_batch_loses_no_record() {
    let (topic, batches) = topic_of_batches("contract-pause").await;
    let pause_after = RECORDS_PER_BATCH + 3;
    // The consumer resumes at the offset after `pause_after`, inside the second batch.
    assert!(inside_a_batch(&batches, pause_after + 1));

    let consumer = consumer();
    assign_at(&consumer, &topic, 0);
    let mut paused_at = None;
    let seen = read_through(&consumer, RECORDS - 1, |consumer, offset| {
        if offset == pause_after {
            // librdkafka drops what it prefetched when a partition is paused, and fetches
            // again from the next offset to deliver when it is resumed: the service's
            // back-pressure does exactly this.
            let assignment = consumer.assignment().unwrap();
            consumer.pause(&assignment).expect("pause");
            paused_at = Some(Instant::now());
            assert!(
                consumer.poll(Duration::ZERO).is_none(),
                "a paused partition delivered a record"
            );
            consumer.resume(&assignment).expect("resume");
        }
    });
    assert!(paused_at.is_some(), "the partition was paused at offset {pause_after}");
    let expected: Vec<(i64, i64)> = (0..RECORDS).map(|offset| (offset, offset)).collect();
    assert_eq!(
        seen, expected,
        "every record once, in order, across the pause at {pause_after}"
    );
}

/// The service end to end through the broker's SASL_SSL listener: SCRAM-SHA-512 and TLS
/// verified against the throwaway CA (host name checking on, as by default). A client with
/// the wrong password is refused, so the listener really authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_through_a_sasl_ssl_listener_with_scram() {
    let broker = broker();
    let secure = |password: &str| {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", &broker.sasl_ssl_bootstrap_servers)
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", SCRAM_USERNAME)
            .set("sasl.password", password)
            .set("ssl.ca.location", broker.ca_file.to_str().unwrap());
        config
    };
    let intruder: BaseConsumer = secure("not-the-password").create().unwrap();
    let refused = intruder.fetch_metadata(None, Duration::from_secs(10)).err();
    assert!(
        matches!(refused, Some(KafkaError::MetadataFetch(_))),
        "a wrong SCRAM password must be refused, got {refused:?}"
    );
    let insider: BaseConsumer = secure(&broker.scram_password).create().unwrap();
    insider
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("the SCRAM user is let in");

    let names = Names::new("sasl");
    names.create(2).await;
    let plaintext_toml = names.kafka_toml();
    let toml = format!(
        r#"{kafka}
        [kafka.security]
        protocol = "sasl_ssl"
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_username = "{SCRAM_USERNAME}"
        sasl_password = "{password}"
        ssl_ca_file = "{ca}"

        [connectors.directory]
        type = "scim2"
        base_url = "http://127.0.0.1:9/unused"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true
        "#,
        kafka = plaintext_toml.replace(&broker.bootstrap_servers, &broker.sasl_ssl_bootstrap_servers),
        password = broker.scram_password,
        ca = broker.ca_file.display(),
    );
    let settings = Settings::from_toml_str(&toml).expect("valid settings");
    assert_eq!(settings.kafka.bootstrap_servers, broker.sasl_ssl_bootstrap_servers);
    let directory = RecordingConnector::new();
    let app = TestApp::spawn(settings, vec![("directory", directory.clone())]).await;

    let producer = crate::support::app::producer();
    let users: BTreeSet<String> = (0..20).map(|user| format!("u{user}")).collect();
    for user in &users {
        let event = event_json(
            &format!("e-{user}"),
            "user.created",
            "acme",
            user,
            serde_json::json!({}),
        );
        publish(&producer, &names.events, Some(&format!("acme/{user}")), &event, &[]).await;
    }
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("a result for every event", Duration::from_secs(60), |records| {
            records.len() >= users.len()
        })
        .await;
    let succeeded: BTreeSet<String> = results
        .records
        .iter()
        .map(|record| record.result())
        .filter(|result| result.status == provisioner::result::Status::Succeeded)
        .map(|result| result.user_id)
        .collect();
    assert_eq!(succeeded, users, "every event applied through the SASL_SSL listener");
    for user in &users {
        assert!(directory.has_account(&format!("acme/{user}")));
    }
    app.stop().await;
}

/// The broker process stops (SIGTERM, a clean shutdown) while the service holds work in
/// flight, and starts again on the same ports and data: the service finishes that work,
/// retries its produces until the broker is back, consumes what was published meanwhile,
/// and every event gets its result. A broker of this test's own, not the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_rides_out_a_restart_of_the_broker_process() {
    const FIRST: usize = 30;
    const ALL: usize = 60;
    let own = Broker::start_own();
    let names = Names::new("restart");
    names.create_on(&own, 2).await;
    let toml = format!(
        r#"{kafka}
        [connectors.directory]
        type = "scim2"
        base_url = "http://127.0.0.1:9/unused"
        [connectors.directory.delivery]
        initial_backoff = "10ms"
        max_backoff = "100ms"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = false
        "#,
        kafka = names
            .kafka_toml()
            .replace(&broker().bootstrap_servers, &own.bootstrap_servers),
    );
    let settings = Settings::from_toml_str(&toml).expect("valid settings");
    let directory = RecordingConnector::new();
    let gate = directory.gated();
    let app = TestApp::spawn(settings, vec![("directory", directory.clone())]).await;
    let producer: FutureProducer = own
        .client_config()
        .set("linger.ms", "0")
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();
    let publish_user = |user: usize| {
        let producer = producer.clone();
        let topic = names.events.clone();
        async move {
            let event = event_json(
                &format!("e-{user}"),
                "user.created",
                "acme",
                &format!("u{user}"),
                serde_json::json!({}),
            );
            publish(&producer, &topic, Some(&format!("acme/u{user}")), &event, &[]).await;
        }
    };
    for user in 0..FIRST {
        publish_user(user).await;
    }
    crate::support::eventually("calls waiting at the target", Duration::from_secs(60), || async {
        (directory.waiting() > 0).then_some(())
    })
    .await;

    // The broker goes away with work in flight; the work then finishes and its results
    // wait for the broker. Events published meanwhile wait in the producer.
    let in_flight = directory.waiting();
    let stopped_at = Instant::now();
    own.stop();
    gate.add_permits(ALL);
    let late = tokio::spawn(futures::future::join_all((FIRST..ALL).map(publish_user)));
    own.restart();
    let down_for = stopped_at.elapsed();
    late.await.expect("late events published");

    let mut results = TopicReader::on(&own, &names.results, 1);
    results
        .read_until("a result for every event", Duration::from_secs(120), |records| {
            let events: BTreeSet<String> = records.iter().map(|record| record.result().event_id).collect();
            events.len() >= ALL
        })
        .await;
    for user in 0..ALL {
        assert!(directory.has_account(&format!("acme/u{user}")), "u{user} applied");
    }
    let produce_failures: u64 = ["reply", "result", "dead_letter"]
        .iter()
        .map(|destination| app.metrics.produce_failures.with_label_values(&[destination]).get())
        .sum();
    app.stop().await;
    eprintln!(
        "FAULT-REPORT broker-restart: {ALL} events; the broker process stopped with {in_flight} calls in flight and was back after {down_for:.1?}; {produce_failures} produces retried; every event has its result, 0 lost"
    );
}

/// The Kafka that users are shown (docker-compose, README) is the one the tests run.
#[test]
fn compose_and_readme_name_the_kafka_version_the_tests_use() {
    let version = crate::support::broker::kafka_version();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let images: Vec<&str> = compose
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: apache/kafka:"))
        .collect();
    assert!(!images.is_empty(), "docker-compose.yml runs no apache/kafka image");
    assert!(
        images.iter().all(|tag| *tag == version),
        "docker-compose.yml uses apache/kafka:{images:?}; the tests use {version}"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("Apache Kafka {version}")),
        "README.md does not name Apache Kafka {version}"
    );
}
