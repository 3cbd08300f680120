//! Hostile and broken input: every kind goes to the dead-letter topic with its reason,
//! the service never panics, and the partition moves on.

use std::time::Duration;

use proptest::prelude::*;
use provisioner::event;

use crate::support::app::{producer, publish, Names, TopicReader};
use crate::support::doubles::{event_json, user_key};
use crate::support::service::ServiceProcess;

/// (name, value, headers, expected reason)
type BadInput<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, &'a str);

fn valid_event() -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": "e", "source": "/s", "type": "user.created",
        "data": {"tenant": "acme", "user": {"id": "u", "userName": "n", "emails": [{"value": "u@example.com"}]}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason() {
    let names = Names::new("bad-input");
    names.create(1).await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("provisioner.toml");
    let kafka = names.kafka_toml();
    std::fs::write(
        &config,
        format!("{kafka}\n[pipeline]\nmax_event_bytes = 4096\n[tenants.acme.resident]\n"),
    )
    .unwrap();
    let mut service = ServiceProcess::start(&config, directory.path().join("service.log"));

    let mut wrong_type = valid_event();
    wrong_type["data"]["user"]["roles"] = serde_json::json!("admin");
    let mut missing_field = valid_event();
    missing_field["data"]["user"]
        .as_object_mut()
        .unwrap()
        .remove("userName");
    let mut unknown_type = valid_event();
    unknown_type["type"] = "user.exploded".into();
    let mut wrong_version = valid_event();
    wrong_version["specversion"] = "0.3".into();
    let mut control_characters = valid_event();
    control_characters["data"]["tenant"] = "ac\u{1b}[31mme".into();
    let oversized = {
        let mut event = valid_event();
        event["data"]["user"]["attributes"] = serde_json::json!({"blob": "x".repeat(8192)});
        event.to_string().into_bytes()
    };
    let data_only = serde_json::to_vec(&valid_event()["data"]).unwrap();
    let cases: Vec<BadInput> = vec![
        (
            "malformed JSON",
            b"{\"specversion\": \"1.0\",".to_vec(),
            vec![],
            "invalid_json",
        ),
        ("not an object", b"[1, 2, 3]".to_vec(), vec![], "invalid_json"),
        (
            "wrong type",
            wrong_type.to_string().into_bytes(),
            vec![],
            "invalid_field",
        ),
        (
            "missing required field",
            missing_field.to_string().into_bytes(),
            vec![],
            "missing_field",
        ),
        (
            "unknown event type",
            unknown_type.to_string().into_bytes(),
            vec![],
            "unknown_event_type",
        ),
        (
            "wrong specversion",
            wrong_version.to_string().into_bytes(),
            vec![],
            "unsupported_specversion",
        ),
        (
            "binary mode without ce_id",
            data_only.clone(),
            vec![
                ("ce_specversion", "1.0"),
                ("ce_type", "user.created"),
                ("ce_source", "/s"),
                ("content-type", "application/json"),
            ],
            "missing_attribute",
        ),
        (
            "binary mode with no ce_ headers",
            data_only,
            vec![("content-type", "application/json")],
            "missing_attribute",
        ),
        ("oversized payload", oversized, vec![], "oversized"),
        ("invalid UTF-8", vec![b'{', 0xC3, 0x28, b'}'], vec![], "invalid_utf8"),
        ("empty value", Vec::new(), vec![], "empty_value"),
        (
            "control characters in an id",
            control_characters.to_string().into_bytes(),
            vec![],
            "invalid_field",
        ),
        (
            "XML content type",
            b"<user/>".to_vec(),
            vec![("ce_specversion", "1.0"), ("content-type", "application/xml")],
            "unsupported_content_type",
        ),
    ];
    let producer = producer();
    for (name, value, headers, _) in &cases {
        publish(&producer, &names.events, Some(name), value, headers).await;
    }
    let good = event_json("after-the-bad", "user.created", "acme", "u-good", serde_json::json!({}));
    publish(&producer, &names.events, Some(&user_key(&good)), &good, &[]).await;

    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("every bad input dead-lettered", Duration::from_secs(60), |records| {
            records.len() >= cases.len()
        })
        .await;
    for (name, value, _, reason) in &cases {
        let letter = dead_letters
            .records
            .iter()
            .find(|record| record.key.as_deref() == Some(*name))
            .unwrap_or_else(|| panic!("no dead letter for {name}"));
        assert_eq!(letter.headers["x-provisioner-reason"], *reason, "{name}");
        assert!(
            !letter.headers["x-provisioner-error"].is_empty(),
            "{name}: no explanation"
        );
        assert_eq!(&letter.value, value, "{name}: the original bytes are kept");
    }
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the good event's result", Duration::from_secs(60), |records| {
            !records.is_empty()
        })
        .await;
    assert_eq!(
        results.records[0].result().event_id,
        "after-the-bad",
        "the partition moved on"
    );

    service.signal("TERM");
    let status = service.wait(Duration::from_secs(60)).await;
    let log = service.log_text();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "the service panicked: {log}");
    eprintln!(
        "FAULT-REPORT bad-input: {} kinds of bad input ({}) each dead-lettered with its reason; the next good event was processed; no panic",
        cases.len(),
        cases.iter().map(|(name, ..)| *name).collect::<Vec<_>>().join(", ")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary bytes and headers never panic the decoder.
    #[test]
    fn the_decoder_never_panics_on_arbitrary_bytes(
        value in proptest::collection::vec(any::<u8>(), 0..512),
        header_values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 0..4),
    ) {
        let names = ["ce_specversion", "ce_id", "content-type", "reply_to"];
        let headers: Vec<(String, Vec<u8>)> = header_values
            .into_iter()
            .enumerate()
            .map(|(index, value)| (names[index % names.len()].to_string(), value))
            .collect();
        let _ = event::decode(Some(&value), &headers, 256);
        let _ = event::reply_route(&headers);
    }

    /// Any JSON value in any field of a valid event either decodes to something that
    /// re-encodes faithfully, or is refused with an error, never a panic.
    #[test]
    fn mutated_events_decode_or_are_refused(
        path_index in 0usize..9,
        replacement in prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([])),
            Just(serde_json::json!({})),
            Just(serde_json::json!(["a", 1])),
        ],
    ) {
        let paths = [
            "/specversion", "/id", "/type", "/data", "/data/tenant", "/data/user",
            "/data/user/id", "/data/user/userName", "/data/user/emails",
        ];
        let mut document = valid_event();
        *document.pointer_mut(paths[path_index]).unwrap() = replacement;
        let bytes = document.to_string().into_bytes();
        if let Ok(decoded) = event::decode(Some(&bytes), &[], 1 << 16) {
            let encoded = serde_json::to_vec(&decoded).unwrap();
            let again = event::decode(Some(&encoded), &[], 1 << 16).unwrap();
            prop_assert_eq!(again, decoded);
        }
    }

    /// Valid events with arbitrary (control-free) identifiers round-trip.
    #[test]
    fn valid_events_round_trip(
        tenant in "[a-z][a-z0-9.]{0,20}",
        user_id in "[^\\p{Cc}]{1,40}",
        user_name in "[^\\p{Cc}]{1,40}",
    ) {
        prop_assume!(!user_id.trim().is_empty() && !user_name.trim().is_empty());
        let mut document = valid_event();
        document["data"]["tenant"] = tenant.into();
        document["data"]["user"]["id"] = user_id.clone().into();
        document["data"]["user"]["userName"] = user_name.into();
        let bytes = document.to_string().into_bytes();
        let decoded = event::decode(Some(&bytes), &[], 1 << 16).unwrap();
        prop_assert_eq!(decoded.subject_id(), user_id.as_str());
        prop_assert_eq!(serde_json::to_value(&decoded).unwrap(), document);
    }
}

/// An event larger than `pipeline.max_event_bytes` on a topic that accepts it (1.5 MB):
/// it is rightly refused as `oversized`, but its dead letter cannot be written whole
/// (the producer's `message.max.bytes` is 1 MB). The dead letter is written truncated,
/// saying so, and the partition moves on instead of retrying for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_to_write_is_truncated_and_the_partition_moves_on() {
    use crate::support::app::TestApp;
    use crate::support::broker::broker;
    use crate::support::doubles::RecordingConnector;

    let names = Names::new("bigdlq");
    broker()
        .create_topics_with(&[&names.events], 1, &[("max.message.bytes", "3000000")])
        .await;
    broker()
        .create_topics_with(&[&names.state], 1, &[("cleanup.policy", "compact")])
        .await;
    broker()
        .create_topics(&[&names.results, &names.replies, &names.dead_letters], 1)
        .await;
    let settings = provisioner::settings::Settings::from_toml_str(&format!(
        r#"{kafka}
        [connectors.directory]
        type = "scim2"
        base_url = "http://127.0.0.1:9/unused"
        [[tenants.acme.resident.bindings]]
        connector = "directory"
        "#,
        kafka = names.kafka_toml()
    ))
    .unwrap();
    let directory = RecordingConnector::new();
    let app = TestApp::spawn(settings, vec![("directory", directory.clone())]).await;

    let mut huge = valid_event();
    huge["data"]["user"]["attributes"] = serde_json::json!({"blob": "x".repeat(1_500_000)});
    let huge = huge.to_string().into_bytes();
    let big_producer: rdkafka::producer::FutureProducer = broker()
        .client_config()
        .set("message.max.bytes", "3000000")
        .create()
        .unwrap();
    publish(&big_producer, &names.events, Some("acme/u"), &huge, &[]).await;
    let good = event_json(
        "after-the-huge",
        "user.created",
        "acme",
        "u-good",
        serde_json::json!({}),
    );
    publish(&producer(), &names.events, Some(&user_key(&good)), &good, &[]).await;

    let mut results = TopicReader::new(&names.results, 1);
    let result = results.result_of("after-the-huge", Duration::from_secs(60)).await;
    assert_eq!(
        result.status,
        provisioner::result::Status::Succeeded,
        "the partition moved on"
    );
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("the truncated dead letter", Duration::from_secs(30), |records| {
            !records.is_empty()
        })
        .await;
    let letter = &dead_letters.records[0];
    assert_eq!(letter.headers["x-provisioner-reason"], "oversized");
    assert_eq!(letter.headers["x-provisioner-truncated-from"], huge.len().to_string());
    assert_eq!(letter.value.len(), provisioner::dead_letter::TRUNCATED_VALUE_BYTES);
    assert_eq!(
        &letter.value[..],
        &huge[..letter.value.len()],
        "the start of the original"
    );
    app.stop().await;
}
