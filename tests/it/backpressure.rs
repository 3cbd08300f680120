//! Back-pressure at scale on Apache Kafka: 100,000 events through a 1,000-event buffer.
//! Fetching pauses and resumes many times, each resume fetching again from an offset that
//! usually sits inside a record batch. Every event must get exactly one result: none lost
//! across a pause, none redone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use provisioner::result::{ResultScope, Status};
use provisioner::settings::Settings;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::support::app::{record_count, Names, OutputRecord, TestApp, TopicReader};
use crate::support::broker::broker;
use crate::support::doubles::{event_json, RecordingConnector};
use crate::support::eventually;

const EVENTS: usize = 100_000;
const USERS: usize = 20_000;
const BUFFER: usize = 1_000;
const PARTITIONS: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_events_through_a_thousand_event_buffer_get_one_result_each() {
    let names = Names::new("backpressure");
    names.create(PARTITIONS).await;
    let toml = format!(
        r#"{kafka}
        [pipeline]
        max_in_flight = 64
        max_buffered_events = {BUFFER}

        [connectors.directory]
        type = "scim2"
        base_url = "http://127.0.0.1:9/unused"
        [connectors.directory.delivery]
        max_in_flight = 32

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = false
        "#,
        kafka = names.kafka_toml(),
    );
    let settings = Settings::from_toml_str(&toml).expect("valid settings");
    // A slower target than the producer: the buffer fills and fetching pauses.
    let directory = RecordingConnector::new().with_latency(Duration::ZERO, Duration::from_micros(500));
    let app = TestApp::spawn(settings, vec![("directory", directory.clone())]).await;

    // Publish in batches of records (linger), as a real identity platform would.
    let producer: FutureProducer = broker()
        .client_config()
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let started = Instant::now();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(5_000) {
        let sends = chunk.iter().map(|&index| {
            let user = format!("u{}", index % USERS);
            let event_type = if index < USERS { "user.created" } else { "user.updated" };
            let payload = event_json(
                &format!("e{index}"),
                event_type,
                "acme",
                &user,
                serde_json::json!({"user": {"displayName": format!("revision {index}")}}),
            );
            let key = format!("acme/{user}");
            let producer = producer.clone();
            let topic = names.events.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&payload),
                        Timeout::After(Duration::from_secs(60)),
                    )
                    .await
                    .map_err(|(error, _)| error)
                    .expect("event acknowledged")
            }
        });
        futures::future::join_all(sends).await;
    }
    let published_in = started.elapsed();

    eventually(
        "fetching to pause for back-pressure",
        Duration::from_secs(60),
        || async { (app.metrics.consumer_paused.get() == 1 || directory.calls().len() >= EVENTS).then_some(()) },
    )
    .await;
    let mut most_buffered = 0;
    let mut results = TopicReader::new(&names.results, 1);
    // Counted incrementally: the reader asks after every record, and the topic holds
    // queued notices as well as complete results.
    let counted = std::cell::Cell::new((0usize, 0usize));
    let complete_results = |records: &[OutputRecord]| {
        let (seen, mut complete) = counted.get();
        complete += records[seen.min(records.len())..]
            .iter()
            .filter(|record| record.result().scope == ResultScope::Complete)
            .count();
        counted.set((records.len(), complete));
        complete
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while complete_results(&results.records) < EVENTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {EVENTS} complete results after 600 s",
            complete_results(&results.records)
        );
        most_buffered = most_buffered.max(app.metrics.events_buffered.get());
        let have = complete_results(&results.records);
        results
            .read_until("more results", Duration::from_secs(120), |records| {
                complete_results(records) >= (have + 1_000).min(EVENTS)
            })
            .await;
    }
    let processed_in = started.elapsed();
    let parked = app.metrics.operations_parked.with_label_values(&["directory"]).get();
    app.stop().await;

    // The results topic, read to its end after the service stopped: exactly one complete
    // result per event, plus one queued notice per parked operation (the slow target
    // makes the connector park part of its work); the high watermark counts every
    // record, so a late duplicate shows.
    let notices: Vec<&OutputRecord> = results
        .records
        .iter()
        .filter(|record| record.result().scope == ResultScope::Queued)
        .collect();
    assert_eq!(notices.len() as u64, parked, "one queued notice per parked operation");
    assert_eq!(
        record_count(&names.results, 1),
        (EVENTS + notices.len()) as i64,
        "records on the results topic: complete results plus queued notices"
    );
    let mut per_event: HashMap<String, usize> = HashMap::with_capacity(EVENTS);
    for record in &results.records {
        let result = record.result();
        if result.scope != ResultScope::Complete {
            continue;
        }
        assert_eq!(result.status, Status::Succeeded, "{result:?}");
        *per_event.entry(result.event_id).or_default() += 1;
    }
    assert_eq!(per_event.len(), EVENTS, "a result for every event");
    assert!(per_event.values().all(|count| *count == 1), "no event has two results");
    assert!(
        most_buffered <= BUFFER as i64,
        "the buffer held {most_buffered} events, over its bound of {BUFFER}"
    );
    eprintln!(
        "BACKPRESSURE-REPORT {EVENTS} events, buffer {BUFFER}: published in {published_in:?}, all results in {processed_in:?}, at most {most_buffered} uncommitted, {} connector calls, {parked} operations parked and drained, 0 lost, 0 duplicated",
        directory.calls().len()
    );
}
