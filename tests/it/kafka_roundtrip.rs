//! The service's own Kafka clients against a real broker: a record produced by
//! `EventProducer` is consumed by `EventConsumer` and decodes to the same event.

use std::sync::Arc;
use std::time::Duration;

use provisioner::admin::Readiness;
use provisioner::event;
use provisioner::kafka::consumer::{EventConsumer, PartitionListener, TopicPartition};
use provisioner::kafka::producer::{EventProducer, OutboundRecord};
use provisioner::metrics::Metrics;
use provisioner::settings::Settings;

use crate::support::broker::broker;
use crate::support::unique_topic;

struct NoListener;

impl PartitionListener for NoListener {
    fn assigned(&self, _: &[TopicPartition]) {}
    fn revoked(&self, _: &[TopicPartition]) {}
}

fn settings(topic: &str) -> Settings {
    Settings::from_toml_str(&format!(
        r#"
        [kafka]
        bootstrap_servers = "{}"
        group_id = "{}"
        event_topics = ["{topic}"]
        "#,
        broker().bootstrap_servers,
        unique_topic("group"),
    ))
    .unwrap()
}

#[tokio::test]
async fn structured_and_binary_events_survive_a_round_trip_through_the_broker() {
    let topic = unique_topic("roundtrip");
    broker().create_topics(&[&topic], 1).await;
    let settings = settings(&topic);
    let producer = EventProducer::new(&settings.kafka).unwrap();
    let readiness = Arc::new(Readiness::default());
    let consumer = EventConsumer::new(
        &settings.kafka,
        Arc::new(Metrics::new()),
        readiness.clone(),
        Arc::new(NoListener),
    )
    .unwrap();
    consumer.subscribe().unwrap();

    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/events/valid/user-created.json"
    ))
    .unwrap();
    let expected = event::decode(Some(&fixture), &[], 1 << 20)
        .unwrap()
        .into_user()
        .expect("a user event");
    producer
        .send(OutboundRecord {
            topic: &topic,
            partition: None,
            key: Some(expected.key().as_bytes()),
            payload: &fixture,
            headers: vec![("content-type", b"application/cloudevents+json")],
        })
        .await
        .unwrap();
    let data = serde_json::to_vec(&expected.data).unwrap();
    producer
        .send(OutboundRecord {
            topic: &topic,
            partition: None,
            key: Some(expected.key().as_bytes()),
            payload: &data,
            headers: vec![
                ("ce_specversion", b"1.0"),
                ("ce_id", expected.id.as_bytes()),
                ("ce_source", expected.source.as_bytes()),
                ("ce_type", b"user.created"),
                ("content-type", b"application/json"),
            ],
        })
        .await
        .unwrap();

    let mut decoded = Vec::new();
    for _ in 0..2 {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a record within 30 s")
            .expect("no consumer error");
        assert_eq!(record.key_text().as_deref(), Some(expected.key().as_str()));
        decoded.push(
            event::decode(record.value.as_deref(), &record.headers, 1 << 20)
                .unwrap()
                .into_user()
                .expect("a user event"),
        );
    }
    assert_eq!(decoded[0], expected, "structured mode");
    assert_eq!(decoded[1].data, expected.data, "binary mode");
    assert_eq!(decoded[1].id, expected.id);
}
