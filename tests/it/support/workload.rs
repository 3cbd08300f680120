//! A workload with a known end state: every user is created, updated twice, and every
//! third one deleted. If an effect is lost, or two events of a user are applied out of
//! order, the target's final state differs from [`Workload::expected`].

use std::collections::BTreeMap;
use std::time::Duration;

use provisioner::devtools::emulators::scim::ScimEmulator;
use rdkafka::producer::FutureProducer;
use serde_json::{json, Value};

use crate::support::app::publish;
use crate::support::doubles::event_json;

pub struct Workload {
    pub users: usize,
    /// (Kafka key, CloudEvent JSON), in publish order.
    pub events: Vec<(String, Vec<u8>)>,
}

/// What the target must hold at the end, per source user id: `Some(family name)` or
/// `None` (deleted).
pub type Expected = BTreeMap<String, Option<String>>;

impl Workload {
    pub fn new(users: usize, tenant: &str) -> Workload {
        let mut events = Vec::new();
        let user_id = |user: usize| format!("w{user:04}");
        let mut push = |user: usize, event_type: &str, family: &str, sequence: usize| {
            let id = user_id(user);
            let payload = event_json(
                &format!("{id}-{sequence}-{event_type}"),
                event_type,
                tenant,
                &id,
                json!({"user": {"userName": format!("user.{id}"), "name": {"givenName": "Test", "familyName": family}}}),
            );
            events.push((format!("{tenant}/{id}"), payload));
        };
        // Rounds interleave users, so a partition holds many users' events in turn.
        for user in 0..users {
            push(user, "user.created", "v1", 0);
        }
        for user in 0..users {
            push(user, "user.updated", "v2", 1);
        }
        for user in 0..users {
            if user % 3 == 0 {
                push(user, "user.deleted", "v2", 2);
            } else {
                push(user, "user.updated", "v3", 2);
            }
        }
        Workload { users, events }
    }

    pub fn expected(&self) -> Expected {
        (0..self.users)
            .map(|user| {
                let id = format!("w{user:04}");
                (id, if user % 3 == 0 { None } else { Some("v3".to_string()) })
            })
            .collect()
    }

    pub async fn publish(&self, producer: &FutureProducer, topic: &str) {
        for (key, payload) in &self.events {
            publish(producer, topic, Some(key), payload, &[]).await;
        }
    }
}

/// The SCIM emulator's state in the same shape as [`Workload::expected`].
pub fn scim_state(emulator: &ScimEmulator) -> Expected {
    emulator
        .users()
        .into_iter()
        .filter_map(|user: Value| {
            let id = user.get("externalId")?.as_str()?.to_string();
            let family = user
                .pointer("/name/familyName")
                .and_then(Value::as_str)
                .map(str::to_string);
            Some((id, family))
        })
        .collect()
}

/// Differences between the target and the oracle, for failure messages.
pub fn differences(expected: &Expected, actual: &Expected) -> Vec<String> {
    let mut problems = Vec::new();
    for (user, want) in expected {
        let have = actual.get(user).cloned().flatten();
        if want != &have {
            problems.push(format!("{user}: expected {want:?}, target has {have:?}"));
        }
    }
    for user in actual.keys() {
        if !expected.contains_key(user) {
            problems.push(format!("{user}: unexpected account"));
        }
    }
    problems
}

/// Polls until the target matches the oracle, or panics with the differences.
pub async fn converge(emulator: &ScimEmulator, expected: &Expected, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let problems = differences(expected, &scim_state(emulator));
        if problems.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the target did not converge within {timeout:?}; {} differences, first: {:?}",
            problems.len(),
            &problems[..problems.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
