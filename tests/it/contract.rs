//! The schemas in `schemas/` and the Rust types must describe the same contract.
//! Every fixture is checked against its schema *and* decoded by the real code, and
//! every enum variant the code can emit is checked against the schema.

use std::path::{Path, PathBuf};

use chrono::Utc;
use provisioner::domain::version::Sequence;
use provisioner::event::{self, EventType};
use provisioner::result::{
    ConnectorResult, ErrorKind, EventVersion, Outcome, ProvisioningResult, ResultError, ResultScope, Status, Superseded,
};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn validator(schema: &str) -> jsonschema::Validator {
    let schema = read_json(&root().join("schemas").join(schema));
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

fn fixtures(directory: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures").join(directory))
        .expect("fixture directory exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {directory}");
    paths
}

fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|error| error.to_string()).collect()
}

#[test]
fn valid_event_fixtures_match_the_schema_and_round_trip() {
    let validator = validator("event.schema.json");
    for path in fixtures("events/valid") {
        let document = read_json(&path);
        let errors = schema_errors(&validator, &document);
        assert!(errors.is_empty(), "{}: schema says {errors:?}", path.display());
        let bytes = std::fs::read(&path).unwrap();
        let decoded = event::decode(Some(&bytes), &[], 1 << 20)
            .unwrap_or_else(|error| panic!("{}: decoder says {error}", path.display()));
        let encoded = serde_json::to_value(&decoded).unwrap();
        assert_eq!(encoded, document, "{}: did not round-trip", path.display());
    }
}

#[test]
fn invalid_event_fixtures_are_refused_by_schema_and_decoder() {
    let validator = validator("event.schema.json");
    for path in fixtures("events/invalid") {
        let document = read_json(&path);
        assert!(
            !validator.is_valid(&document),
            "{}: the schema accepts an event the service refuses",
            path.display()
        );
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            event::decode(Some(&bytes), &[], 1 << 20).is_err(),
            "{}: the decoder accepts an event the schema refuses",
            path.display()
        );
    }
}

#[test]
fn binary_mode_data_matches_the_data_schema() {
    let validator = validator("event.schema.json");
    for path in fixtures("events/valid") {
        let document = read_json(&path);
        let headers: Vec<(String, Vec<u8>)> = [
            ("ce_specversion", "1.0"),
            ("ce_id", document["id"].as_str().unwrap()),
            ("ce_source", document["source"].as_str().unwrap()),
            ("ce_type", document["type"].as_str().unwrap()),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect();
        let data = document["data"].to_string();
        let decoded = event::decode(Some(data.as_bytes()), &headers, 1 << 20)
            .unwrap_or_else(|error| panic!("{}: binary mode: {error}", path.display()));
        assert_eq!(decoded.data_json(), document["data"]);
        // The structured form of what binary mode decoded is itself schema-valid.
        let errors = schema_errors(&validator, &serde_json::to_value(&decoded).unwrap());
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
    }
}

#[test]
fn result_fixtures_match_the_schema_and_round_trip() {
    let validator = validator("result.schema.json");
    for path in fixtures("results") {
        let document = read_json(&path);
        let errors = schema_errors(&validator, &document);
        assert!(errors.is_empty(), "{}: schema says {errors:?}", path.display());
        let parsed: ProvisioningResult =
            serde_json::from_value(document.clone()).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert_eq!(serde_json::to_value(&parsed).unwrap(), document, "{}", path.display());
    }
}

/// Every variant the code can write must be allowed by the schema.
#[test]
fn every_result_the_code_can_emit_is_schema_valid() {
    let validator = validator("result.schema.json");
    let kinds = [
        ErrorKind::Transport,
        ErrorKind::Timeout,
        ErrorKind::Throttled,
        ErrorKind::Server,
        ErrorKind::Rejected,
        ErrorKind::Auth,
        ErrorKind::Conflict,
        ErrorKind::InvalidResponse,
        ErrorKind::Rule,
        ErrorKind::Exhausted,
        ErrorKind::Internal,
        ErrorKind::Revoked,
        ErrorKind::Dependency,
    ];
    let now = Utc::now();
    for (index, outcome) in Outcome::ALL.into_iter().enumerate() {
        let event_type = EventType::ALL[index % EventType::ALL.len()];
        let kind = kinds[index % kinds.len()];
        let results = vec![ConnectorResult {
            connector: "c".into(),
            operation: event_type.operation(),
            outcome,
            blocking: index % 2 == 0,
            remote_id: Some("r".into()),
            attempts: 3,
            error: Some(ResultError {
                kind,
                message: "m".into(),
                http_status: Some(503),
                retryable: true,
            }),
            superseded_by: (outcome == Outcome::Stale).then(|| Superseded {
                event_id: "newer".into(),
                version: EventVersion {
                    epoch: 1,
                    partition: 3,
                    offset: 42,
                    sequence: Some(Sequence {
                        source: "/wso2".into(),
                        value: "0042".into(),
                    }),
                },
            }),
            reason: (outcome == Outcome::Skipped).then(|| "not in the map".into()),
            members_added: (outcome == Outcome::MembersAdded).then_some(100),
            members_removed: (outcome == Outcome::MembersRemoved).then_some(2),
            started_at: now,
            finished_at: now,
        }];
        for scope in [ResultScope::Blocking, ResultScope::Complete, ResultScope::Queued] {
            let result = ProvisioningResult {
                correlation_id: Some("c".into()),
                event_id: "e".into(),
                event_type: Some(event_type),
                tenant: "t".into(),
                user_id: "u".into(),
                group_id: event_type.is_group().then(|| "g".into()),
                status: Status::from_results(&results),
                scope,
                reason: None,
                results: results.clone(),
                version: Some(EventVersion {
                    epoch: 0,
                    partition: 1,
                    offset: 7,
                    sequence: None,
                }),
                received_at: now,
                completed_at: now,
            };
            let instance = serde_json::to_value(&result).unwrap();
            let errors = schema_errors(&validator, &instance);
            assert!(errors.is_empty(), "{instance}: {errors:?}");
        }
    }
    for kind in kinds {
        let instance = serde_json::to_value(kind).unwrap();
        assert!(
            validator.is_valid(&serde_json::json!({
                "event_id": "e", "tenant": "t", "user_id": "u", "status": "failed", "scope": "complete",
                "results": [{"connector": "c", "operation": "create", "outcome": "failed", "blocking": false,
                             "attempts": 1, "error": {"kind": instance, "message": "m", "retryable": false},
                             "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z"}],
                "received_at": "2026-01-01T00:00:00Z", "completed_at": "2026-01-01T00:00:00Z"
            })),
            "error kind {kind:?} is missing from the schema"
        );
    }
    for status in [
        Status::Succeeded,
        Status::Failed,
        Status::Partial,
        Status::Skipped,
        Status::Queued,
    ] {
        assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
    }
}
