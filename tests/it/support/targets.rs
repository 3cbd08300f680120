//! The Google and Salesforce emulators with a connector configured against each: what
//! the connector tests for users and for groups start from.

use std::sync::Arc;
use std::time::Duration;

use provisioner::connectors::google::settings::GoogleSettings;
use provisioner::connectors::google::GoogleConnector;
use provisioner::connectors::jwt::RsaSigner;
use provisioner::connectors::salesforce::settings::SalesforceSettings;
use provisioner::connectors::salesforce::SalesforceConnector;
use provisioner::connectors::{Connector, ConnectorError};
use provisioner::devtools::emulators::google::{self as google_emulator, GoogleEmulator, GoogleEmulatorSettings};
use provisioner::devtools::emulators::salesforce::{
    self as salesforce_emulator, SalesforceEmulator, SalesforceEmulatorSettings,
};
use provisioner::devtools::emulators::Faults;
use provisioner::domain::{GroupChange, GroupRef, MemberAction, MemberRef, MembersChange, Operation};
use provisioner::event::{self, UserEvent};
use provisioner::metrics::Metrics;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::doubles::event_json;

pub const SERVICE_ACCOUNT: &str = "provisioner@demo-project.iam.gserviceaccount.com";
pub const ADMIN: &str = "admin@example.com";

pub struct GoogleFixture {
    pub emulator: GoogleEmulator,
    pub key: RsaSigner,
    _shutdown: CancellationToken,
}

impl GoogleFixture {
    pub async fn start() -> GoogleFixture {
        let key = RsaSigner::generate();
        let shutdown = CancellationToken::new();
        let emulator = google_emulator::start(
            "127.0.0.1:0".parse().unwrap(),
            GoogleEmulatorSettings {
                domain: "example.com".into(),
                client_email: SERVICE_ACCOUNT.into(),
                public_key: key.public_key(),
                admin_email: ADMIN.into(),
                token_lifetime: Duration::from_secs(3600),
                faults: Faults::default(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        GoogleFixture {
            emulator,
            key,
            _shutdown: shutdown,
        }
    }

    pub fn key_json(&self, signer: &RsaSigner) -> String {
        json!({
            "type": "service_account",
            "client_email": SERVICE_ACCOUNT,
            "private_key": signer.private_key_pem(),
            "token_uri": self.emulator.token_url(),
        })
        .to_string()
    }

    pub fn settings(&self, extra: Value) -> GoogleSettings {
        let mut settings = json!({
            "domain": "example.com",
            "service_account_key": self.key_json(&self.key),
            "admin_email": ADMIN,
            "api_base_url": self.emulator.api_base_url(),
        });
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                settings[key] = value;
            }
        }
        serde_json::from_value(settings).unwrap()
    }

    pub fn connector(&self, extra: Value) -> GoogleConnector {
        GoogleConnector::new("workspace", &self.settings(extra)).unwrap()
    }
}

pub const CLIENT_ID: &str = "3MVG9emulator";
pub const CLIENT_SECRET: &str = "client-secret-5e1f";
pub const API_USER: &str = "integration@crm.example.com";

pub struct SalesforceFixture {
    pub emulator: SalesforceEmulator,
    pub key: RsaSigner,
    pub metrics: Arc<Metrics>,
    _shutdown: CancellationToken,
}

impl SalesforceFixture {
    pub async fn start(foreign_usernames: Vec<String>) -> SalesforceFixture {
        let key = RsaSigner::generate();
        let shutdown = CancellationToken::new();
        let emulator = salesforce_emulator::start(
            "127.0.0.1:0".parse().unwrap(),
            SalesforceEmulatorSettings {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                username: API_USER.into(),
                password_with_token: "pa55wordTOKEN123".into(),
                public_key: Some(key.public_key()),
                session_lifetime: Duration::from_secs(7200),
                foreign_usernames,
                faults: Faults::default(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        SalesforceFixture {
            emulator,
            key,
            metrics: Arc::new(Metrics::new()),
            _shutdown: shutdown,
        }
    }

    pub fn settings(&self, auth: Value, extra: Value) -> SalesforceSettings {
        let mut settings = json!({
            "login_url": self.emulator.login_url(),
            "auth": auth,
            "provisioning_domain": "crm.example.com",
            "profile_id": "00e000000000001AAA",
        });
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                settings[key] = value;
            }
        }
        serde_json::from_value(settings).unwrap()
    }

    pub fn client_credentials(&self) -> Value {
        json!({"grant": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    }

    pub fn connector(&self, extra: Value) -> SalesforceConnector {
        SalesforceConnector::new(
            "crm",
            &self.settings(self.client_credentials(), extra),
            self.metrics.clone(),
            None,
        )
        .unwrap()
    }
}

/// A decoded user event of `event_type` for `acme`/`user_id`, `user` overlaid on the
/// default user.
pub fn user_event(event_type: &str, user_id: &str, user: Value) -> UserEvent {
    let bytes = event_json(
        &format!("{event_type}-{user_id}"),
        event_type,
        "acme",
        user_id,
        json!({"user": user}),
    );
    event::decode(Some(&bytes), &[], 1 << 20)
        .unwrap()
        .into_user()
        .expect("a user event")
}

/// A change of the group `group_id` of tenant `acme`.
pub fn group_change<'a>(
    operation: Operation,
    group_id: &'a str,
    display_name: &'a str,
    remote_id: Option<&'a str>,
) -> GroupChange<'a> {
    GroupChange {
        operation,
        event_id: "group-event",
        tenant: "acme",
        group_id,
        display_name,
        remote_id,
    }
}

/// Creates `count` users `{prefix}-0` … through `connector`; returns them as members.
pub async fn create_members(connector: &impl Connector, prefix: &str, count: usize) -> Vec<MemberRef> {
    let mut members = Vec::with_capacity(count);
    for index in 0..count {
        let user_id = format!("{prefix}-{index}");
        let created = user_event("user.created", &user_id, json!({"userName": user_id}));
        let applied = connector.apply(created.change(Operation::Create)).await.unwrap();
        members.push(MemberRef {
            user_id,
            remote_id: applied.remote_id.expect("a created user has a remote id"),
        });
    }
    members
}

/// Adds or removes `members` as the pipeline does: in calls of at most the connector's
/// `max_members_per_request`, stopping at the first error.
pub async fn apply_members_in_batches(
    connector: &impl Connector,
    action: MemberAction,
    group: GroupRef<'_>,
    members: &[MemberRef],
) -> Result<(), ConnectorError> {
    for batch in members.chunks(connector.max_members_per_request()) {
        connector
            .apply_members(MembersChange {
                action,
                tenant: "acme",
                group,
                members: batch,
            })
            .await?;
    }
    Ok(())
}
