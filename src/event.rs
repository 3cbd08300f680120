//! The inbound contract: user and group lifecycle events as CloudEvents 1.0 over Kafka.
//!
//! Both content modes of the CloudEvents Kafka protocol binding are accepted:
//! - structured: the value is the whole event as JSON
//!   (`content-type: application/cloudevents+json`, or no content-type and no `ce_` headers);
//! - binary: attributes in `ce_*` headers, the value is the `data` JSON.
//!
//! [`decode`] is the only place where bytes become an [`Event`]; anything it rejects
//! goes to the dead-letter topic with [`DecodeError::reason`] as the reason code.
//! Unknown fields are ignored so producers can add claims without breaking us.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::version::EventVersion;
use crate::domain::{MemberAction, Operation, UserChange};
// The user and the group are domain types; events carry them as `data.user`, `data.group`.
pub use crate::domain::{Email, Group, Name, User};

/// The only CloudEvents version we speak.
pub const SPEC_VERSION: &str = "1.0";
/// Header a blocking caller sets to correlate the reply.
pub const CORRELATION_ID_HEADER: &str = "correlation_id";
/// Header a blocking caller sets to name the reply topic.
pub const REPLY_TO_HEADER: &str = "reply_to";
const CONTENT_TYPE_HEADER: &str = "content-type";
const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Longest accepted tenant, user id or user name: these end up in keys, URLs and filters.
const MAX_IDENTIFIER_LENGTH: usize = 512;
/// A group's key is `tenant/group:<group id>`; user ids may not begin with it, so that a
/// group's key can never be a user's (in the lanes, the state and the results).
pub const GROUP_KEY_PREFIX: &str = "group:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum EventType {
    #[serde(rename = "user.created")]
    UserCreated,
    #[serde(rename = "user.self_signed_up")]
    UserSelfSignedUp,
    #[serde(rename = "user.jit_provisioned")]
    UserJitProvisioned,
    #[serde(rename = "user.updated")]
    UserUpdated,
    #[serde(rename = "user.deleted")]
    UserDeleted,
    #[serde(rename = "group.created")]
    GroupCreated,
    #[serde(rename = "group.updated")]
    GroupUpdated,
    #[serde(rename = "group.deleted")]
    GroupDeleted,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::UserCreated,
        EventType::UserSelfSignedUp,
        EventType::UserJitProvisioned,
        EventType::UserUpdated,
        EventType::UserDeleted,
        EventType::GroupCreated,
        EventType::GroupUpdated,
        EventType::GroupDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::UserCreated => "user.created",
            EventType::UserSelfSignedUp => "user.self_signed_up",
            EventType::UserJitProvisioned => "user.jit_provisioned",
            EventType::UserUpdated => "user.updated",
            EventType::UserDeleted => "user.deleted",
            EventType::GroupCreated => "group.created",
            EventType::GroupUpdated => "group.updated",
            EventType::GroupDeleted => "group.deleted",
        }
    }

    /// A group's event, not a user's.
    pub fn is_group(self) -> bool {
        matches!(
            self,
            EventType::GroupCreated | EventType::GroupUpdated | EventType::GroupDeleted
        )
    }

    /// What a connector is asked to do for this kind of event.
    pub fn operation(self) -> Operation {
        match self {
            EventType::UserCreated
            | EventType::UserSelfSignedUp
            | EventType::UserJitProvisioned
            | EventType::GroupCreated => Operation::Create,
            EventType::UserUpdated | EventType::GroupUpdated => Operation::Update,
            EventType::UserDeleted | EventType::GroupDeleted => Operation::Delete,
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL
            .into_iter()
            .find(|event_type| event_type.as_str() == text)
    }
}

/// A validated event: a user's or a group's.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    User(UserEvent),
    Group(GroupEvent),
    /// One member of a group on one connector, from the service's own membership topic
    /// (never from the input): applied in the member's lane.
    Membership(MembershipRecord),
}

/// The content type of a membership record: only read from the membership topic and
/// from retry topics, never from the input.
pub const MEMBERSHIP_CONTENT_TYPE: &str = "application/vnd.provisioner.membership+json";
/// Current layout of a membership record.
pub const MEMBERSHIP_SCHEMA_VERSION: u32 = 1;

/// A membership to apply: written by a group's event, once the group exists on the
/// connector, to the member's partition of the membership topic (keyed like the
/// member's own events), so that it runs in the member's (user, connector) lane, after
/// the member's create, with the member's remote id at hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipRecord {
    pub schema: u32,
    pub connector: String,
    pub action: MemberAction,
    pub tenant: String,
    pub user_id: String,
    pub group: MembershipGroup,
    /// The group's event that asked for it.
    pub event_id: String,
    pub event_type: EventType,
    /// The group event's version: each (group, member, connector) keeps the newest.
    pub version: EventVersion,
    /// When the group's event wrote it: a member's create is waited for from then.
    pub emitted_at: DateTime<Utc>,
}

/// The group as a membership names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipGroup {
    pub id: String,
    #[serde(rename = "displayName")]
    pub display_name: String,
    /// The group's id on the connector's target.
    pub remote_id: String,
}

impl MembershipRecord {
    /// The member's key, `tenant/user id`: the record goes to the member's partition.
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant, self.user_id)
    }
}

/// Reads a membership record (from the membership topic or a retry topic).
pub fn decode_membership(value: Option<&[u8]>) -> Result<MembershipRecord, DecodeError> {
    let value = value.unwrap_or_default();
    if value.is_empty() {
        return Err(DecodeError::EmptyValue);
    }
    let record: MembershipRecord = serde_json::from_slice(value).map_err(|error| DecodeError::InvalidJson {
        message: error.to_string(),
    })?;
    if record.schema > MEMBERSHIP_SCHEMA_VERSION {
        return Err(DecodeError::InvalidField {
            path: "schema".into(),
            message: format!(
                "membership layout {} is newer than this service's {MEMBERSHIP_SCHEMA_VERSION}",
                record.schema
            ),
        });
    }
    Ok(record)
}

/// Whether a record's headers say it is a membership record.
pub fn is_membership(headers: &[(String, Vec<u8>)]) -> bool {
    headers
        .iter()
        .rev()
        .find(|(name, _)| name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
        .is_some_and(|(_, value)| value == MEMBERSHIP_CONTENT_TYPE.as_bytes())
}

/// A CloudEvents 1.0 event whose `data` is `D`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent<D> {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// The CloudEvents `sequence` extension: the producer's own order of its events,
    /// compared between events of the same `source` (see `domain::version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
    pub data: D,
}

/// A user lifecycle event.
pub type UserEvent = CloudEvent<UserEventData>;
/// A group lifecycle event.
pub type GroupEvent = CloudEvent<GroupEventData>;

/// What every event has, whoever it is about.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub id: &'a str,
    pub source: &'a str,
    pub event_type: EventType,
    pub sequence: Option<&'a str>,
    pub tenant: &'a str,
    pub service_provider: Option<&'a str>,
}

impl Event {
    pub fn envelope(&self) -> Envelope<'_> {
        match self {
            Event::Membership(record) => Envelope {
                id: &record.event_id,
                source: "",
                event_type: record.event_type,
                sequence: None,
                tenant: &record.tenant,
                service_provider: None,
            },
            Event::User(event) => Envelope {
                id: &event.id,
                source: &event.source,
                event_type: event.event_type,
                sequence: event.sequence.as_deref(),
                tenant: &event.data.tenant,
                service_provider: event.data.service_provider.as_deref(),
            },
            Event::Group(event) => Envelope {
                id: &event.id,
                source: &event.source,
                event_type: event.event_type,
                sequence: event.sequence.as_deref(),
                tenant: &event.data.tenant,
                service_provider: event.data.service_provider.as_deref(),
            },
        }
    }

    pub fn id(&self) -> &str {
        self.envelope().id
    }

    pub fn event_type(&self) -> EventType {
        self.envelope().event_type
    }

    pub fn tenant(&self) -> &str {
        self.envelope().tenant
    }

    /// The ordering key, which is also the record's key: `tenant/user id`, or
    /// `tenant/group:group id`. Events with the same key are applied in order.
    pub fn key(&self) -> String {
        match self {
            Event::User(event) => event.key(),
            Event::Group(event) => event.key(),
            Event::Membership(record) => record.key(),
        }
    }

    /// The user's id, or the group's.
    pub fn subject_id(&self) -> &str {
        match self {
            Event::User(event) => &event.data.user.id,
            Event::Group(event) => &event.data.group.id,
            Event::Membership(record) => &record.user_id,
        }
    }

    pub fn into_user(self) -> Option<UserEvent> {
        match self {
            Event::User(event) => Some(event),
            _ => None,
        }
    }

    /// The event's `data`, as JSON.
    pub fn data_json(&self) -> serde_json::Value {
        match self {
            Event::User(event) => serde_json::to_value(&event.data),
            Event::Group(event) => serde_json::to_value(&event.data),
            Event::Membership(record) => serde_json::to_value(record),
        }
        .expect("event data serialises")
    }

    pub fn as_user(&self) -> Option<&UserEvent> {
        match self {
            Event::User(event) => Some(event),
            _ => None,
        }
    }

    pub fn as_group(&self) -> Option<&GroupEvent> {
        match self {
            Event::Group(event) => Some(event),
            _ => None,
        }
    }

    pub fn as_membership(&self) -> Option<&MembershipRecord> {
        match self {
            Event::Membership(record) => Some(record),
            _ => None,
        }
    }
}

impl CloudEvent<()> {
    fn with_data<D>(self, data: D) -> CloudEvent<D> {
        CloudEvent {
            specversion: self.specversion,
            id: self.id,
            source: self.source,
            event_type: self.event_type,
            time: self.time,
            subject: self.subject,
            datacontenttype: self.datacontenttype,
            sequence: self.sequence,
            data,
        }
    }
}

impl UserEvent {
    /// The ordering key: events with the same key are applied strictly in order.
    pub fn key(&self) -> String {
        format!("{}/{}", self.data.tenant, self.data.user.id)
    }

    /// This event's user, as a connector is asked to change it.
    pub fn change(&self, operation: Operation) -> UserChange<'_> {
        UserChange {
            operation,
            event_id: &self.id,
            tenant: &self.data.tenant,
            identity_provider: self.data.identity_provider.as_deref(),
            user: &self.data.user,
            remote_id: None,
        }
    }
}

impl GroupEvent {
    /// `tenant/group:<id>`: never a user's key (user ids may not begin with `group:`).
    pub fn key(&self) -> String {
        group_key(&self.data.tenant, &self.data.group.id)
    }
}

/// The key of group `group_id` of `tenant`.
pub fn group_key(tenant: &str, group_id: &str) -> String {
    format!("{tenant}/{GROUP_KEY_PREFIX}{group_id}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupEventData {
    /// Tenant domain, e.g. `carbon.super`.
    pub tenant: String,
    /// Application that caused the change; absent means the tenant's resident provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_provider: Option<String>,
    pub group: Group,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserEventData {
    /// Tenant domain, e.g. `carbon.super`.
    pub tenant: String,
    /// Application that caused the change; absent means the tenant's resident provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_provider: Option<String>,
    /// The federated identity provider, for JIT-provisioned users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<String>,
    pub user: User,
}

/// Where a blocking caller wants its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    pub correlation_id: String,
    pub reply_to: String,
}

/// Why an event was not accepted. Each variant has a fixed reason code, used as the
/// dead-letter reason header and as a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event is {size} bytes, over the {limit}-byte limit")]
    Oversized { size: usize, limit: usize },
    #[error("event has no value")]
    EmptyValue,
    #[error("event is not valid UTF-8 (at byte {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
    #[error("event is not valid JSON: {message}")]
    InvalidJson { message: String },
    #[error("header `{name}` is not valid UTF-8")]
    InvalidHeader { name: String },
    #[error("CloudEvents attribute `{name}` is missing")]
    MissingAttribute { name: String },
    #[error("CloudEvents attribute `{name}` is invalid: {message}")]
    InvalidAttribute { name: String, message: String },
    #[error("unsupported CloudEvents specversion `{version}` (expected 1.0)")]
    UnsupportedSpecVersion { version: String },
    #[error("unknown event type `{event_type}`")]
    UnknownEventType { event_type: String },
    #[error("unsupported content type `{content_type}`")]
    UnsupportedContentType { content_type: String },
    #[error("required field `data.{path}` is missing")]
    MissingField { path: String },
    #[error("field `data.{path}` is invalid: {message}")]
    InvalidField { path: String, message: String },
    /// The provisioning state needs every event of a user on one partition, so input
    /// records must be keyed `tenant/user id`.
    #[error("the record's key is {found} but must be the event's `tenant/user id`, {expected:?}, so that all of a user's events share one partition")]
    WrongKey { expected: String, found: String },
}

impl DecodeError {
    /// Every reason code [`DecodeError::reason`] can return.
    pub const REASONS: [&'static str; 13] = [
        "oversized",
        "empty_value",
        "invalid_utf8",
        "invalid_json",
        "invalid_header",
        "missing_attribute",
        "invalid_attribute",
        "unsupported_specversion",
        "unknown_event_type",
        "unsupported_content_type",
        "missing_field",
        "invalid_field",
        "wrong_key",
    ];

    /// Closed set of reason codes, safe as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::EmptyValue => "empty_value",
            DecodeError::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeError::InvalidJson { .. } => "invalid_json",
            DecodeError::InvalidHeader { .. } => "invalid_header",
            DecodeError::MissingAttribute { .. } => "missing_attribute",
            DecodeError::InvalidAttribute { .. } => "invalid_attribute",
            DecodeError::UnsupportedSpecVersion { .. } => "unsupported_specversion",
            DecodeError::UnknownEventType { .. } => "unknown_event_type",
            DecodeError::UnsupportedContentType { .. } => "unsupported_content_type",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::WrongKey { .. } => "wrong_key",
        }
    }
}

/// With the provisioning state on, the record's key must be the event's `tenant/user
/// id` (a group's: `tenant/group:group id`): the state of a user lives on the partition
/// its events go to.
pub fn check_key(event: Event, key: Option<&[u8]>) -> Result<Event, DecodeError> {
    let expected = event.key();
    if key == Some(expected.as_bytes()) {
        return Ok(event);
    }
    let found = match key {
        None => "absent".to_string(),
        Some(key) => format!("{:?}", String::from_utf8_lossy(key)),
    };
    Err(DecodeError::WrongKey { expected, found })
}

/// Decodes one Kafka record (value plus headers) into a validated event.
pub fn decode(
    value: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
    max_event_bytes: usize,
) -> Result<Event, DecodeError> {
    let value = value.unwrap_or_default();
    if value.len() > max_event_bytes {
        return Err(DecodeError::Oversized {
            size: value.len(),
            limit: max_event_bytes,
        });
    }
    let content_type = header_text(headers, CONTENT_TYPE_HEADER)?;
    let has_ce_headers = headers.iter().any(|(name, _)| name.starts_with("ce_"));
    let structured = match &content_type {
        Some(content_type) if content_type.starts_with("application/cloudevents-batch") => {
            return Err(DecodeError::UnsupportedContentType {
                content_type: content_type.clone(),
            })
        }
        Some(content_type) if content_type == MEMBERSHIP_CONTENT_TYPE => {
            // The service's own records are read from its own topics only.
            return Err(DecodeError::UnsupportedContentType {
                content_type: content_type.clone(),
            });
        }
        Some(content_type) => content_type.starts_with(STRUCTURED_CONTENT_TYPE),
        None => !has_ce_headers,
    };
    if !structured {
        if let Some(content_type) = &content_type {
            let essence = content_type.split(';').next().unwrap_or_default().trim();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(DecodeError::UnsupportedContentType {
                    content_type: content_type.clone(),
                });
            }
        }
    }
    if value.is_empty() {
        return Err(DecodeError::EmptyValue);
    }
    let text = std::str::from_utf8(value).map_err(|error| DecodeError::InvalidUtf8 {
        valid_up_to: error.valid_up_to(),
    })?;
    let document: serde_json::Value = serde_json::from_str(text).map_err(|error| DecodeError::InvalidJson {
        message: error.to_string(),
    })?;
    if structured {
        decode_structured(document)
    } else {
        decode_binary(document, headers, content_type)
    }
}

/// The `correlation_id` and `reply_to` headers, when the caller is blocking.
pub fn reply_route(headers: &[(String, Vec<u8>)]) -> Result<Option<ReplyRoute>, DecodeError> {
    let correlation_id = header_text(headers, CORRELATION_ID_HEADER)?;
    let reply_to = header_text(headers, REPLY_TO_HEADER)?;
    Ok(match (correlation_id, reply_to) {
        (Some(correlation_id), Some(reply_to)) if !correlation_id.is_empty() && !reply_to.is_empty() => {
            Some(ReplyRoute {
                correlation_id,
                reply_to,
            })
        }
        _ => None,
    })
}

fn header_text(headers: &[(String, Vec<u8>)], name: &str) -> Result<Option<String>, DecodeError> {
    headers
        .iter()
        .rev()
        .find(|(header, _)| header.eq_ignore_ascii_case(name))
        .map(|(header, bytes)| {
            String::from_utf8(bytes.clone()).map_err(|_| DecodeError::InvalidHeader { name: header.clone() })
        })
        .transpose()
}

fn decode_structured(document: serde_json::Value) -> Result<Event, DecodeError> {
    let serde_json::Value::Object(mut object) = document else {
        return Err(DecodeError::InvalidJson {
            message: "a structured-mode event must be a JSON object".into(),
        });
    };
    let mut attribute = |name: &str| -> Result<Option<String>, DecodeError> {
        match object.remove(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(DecodeError::InvalidAttribute {
                name: name.into(),
                message: "must be a string".into(),
            }),
        }
    };
    let attributes = Attributes {
        specversion: attribute("specversion")?,
        id: attribute("id")?,
        source: attribute("source")?,
        event_type: attribute("type")?,
        time: attribute("time")?,
        subject: attribute("subject")?,
        datacontenttype: attribute("datacontenttype")?,
        sequence: attribute("sequence")?,
    };
    if object.contains_key("data_base64") {
        return Err(DecodeError::UnsupportedContentType {
            content_type: "data_base64 (binary data)".into(),
        });
    }
    let data = object
        .remove("data")
        .ok_or_else(|| DecodeError::MissingAttribute { name: "data".into() })?;
    attributes.into_event(data, "")
}

fn decode_binary(
    data: serde_json::Value,
    headers: &[(String, Vec<u8>)],
    content_type: Option<String>,
) -> Result<Event, DecodeError> {
    let attributes = Attributes {
        specversion: header_text(headers, "ce_specversion")?,
        id: header_text(headers, "ce_id")?,
        source: header_text(headers, "ce_source")?,
        event_type: header_text(headers, "ce_type")?,
        time: header_text(headers, "ce_time")?,
        subject: header_text(headers, "ce_subject")?,
        datacontenttype: content_type,
        sequence: header_text(headers, "ce_sequence")?,
    };
    attributes.into_event(data, "ce_")
}

/// CloudEvents context attributes as found, before validation.
struct Attributes {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    event_type: Option<String>,
    time: Option<String>,
    subject: Option<String>,
    datacontenttype: Option<String>,
    sequence: Option<String>,
}

impl Attributes {
    /// `prefix` is `ce_` in binary mode, so errors name the header the producer must set.
    fn into_event(self, data: serde_json::Value, prefix: &str) -> Result<Event, DecodeError> {
        let required = |value: Option<String>, name: &str| {
            value
                .filter(|text| !text.is_empty())
                .ok_or_else(|| DecodeError::MissingAttribute {
                    name: format!("{prefix}{name}"),
                })
        };
        let specversion = required(self.specversion, "specversion")?;
        if specversion != SPEC_VERSION {
            return Err(DecodeError::UnsupportedSpecVersion { version: specversion });
        }
        let id = required(self.id, "id")?;
        let source = required(self.source, "source")?;
        let type_text = required(self.event_type, "type")?;
        let event_type = EventType::parse(&type_text).ok_or(DecodeError::UnknownEventType { event_type: type_text })?;
        let time = self
            .time
            .map(|text| {
                DateTime::parse_from_rfc3339(&text)
                    .map(|time| time.with_timezone(&Utc))
                    .map_err(|error| DecodeError::InvalidAttribute {
                        name: format!("{prefix}time"),
                        message: error.to_string(),
                    })
            })
            .transpose()?;
        let header = CloudEvent {
            specversion,
            id,
            source,
            event_type,
            time,
            subject: self.subject,
            datacontenttype: self.datacontenttype,
            sequence: self.sequence.filter(|sequence| !sequence.is_empty()),
            data: (),
        };
        Ok(if event_type.is_group() {
            Event::Group(header.with_data(decode_group_data(data, event_type)?))
        } else {
            Event::User(header.with_data(decode_data(data)?))
        })
    }
}

/// `data` as `T`, once every `required` path is there: required fields are checked by
/// hand first so that a missing one is reported as missing, not as a type error from
/// deep inside serde; a type error names the field's path.
fn deserialize_required<T: serde::de::DeserializeOwned>(
    data: serde_json::Value,
    required: &[&str],
) -> Result<T, DecodeError> {
    for path in required {
        let found = path
            .split('.')
            .try_fold(&data, |node, segment| node.get(segment))
            .is_some_and(|node| !node.is_null());
        if !found {
            return Err(DecodeError::MissingField { path: (*path).into() });
        }
    }
    serde_path_to_error::deserialize(data).map_err(|error| DecodeError::InvalidField {
        path: error.path().to_string(),
        message: error.into_inner().to_string(),
    })
}

fn decode_data(data: serde_json::Value) -> Result<UserEventData, DecodeError> {
    let data: UserEventData = deserialize_required(data, &["tenant", "user", "user.id", "user.userName"])?;
    for (path, value) in [
        ("tenant", &data.tenant),
        ("user.id", &data.user.id),
        ("user.userName", &data.user.user_name),
    ] {
        check_identifier(path, value)?;
    }
    check_user_id("user.id", &data.user.id)?;
    for (path, value) in [
        ("service_provider", &data.service_provider),
        ("identity_provider", &data.identity_provider),
        ("user.userStoreDomain", &data.user.user_store_domain),
    ] {
        if let Some(value) = value {
            check_identifier(path, value)?;
        }
    }
    Ok(data)
}

fn decode_group_data(data: serde_json::Value, event_type: EventType) -> Result<GroupEventData, DecodeError> {
    let mut data: GroupEventData = deserialize_required(data, &["tenant", "group", "group.id", "group.displayName"])?;
    for (path, value) in [
        ("tenant", &data.tenant),
        ("group.id", &data.group.id),
        ("group.displayName", &data.group.display_name),
    ] {
        check_identifier(path, value)?;
    }
    if let Some(value) = &data.service_provider {
        check_identifier("service_provider", value)?;
    }
    let group = &mut data.group;
    let invalid = |path: &str, message: &str| DecodeError::InvalidField {
        path: path.into(),
        message: message.into(),
    };
    match event_type {
        EventType::GroupCreated => {
            if !group.added.is_empty() || !group.removed.is_empty() {
                let path = if group.added.is_empty() {
                    "group.removed"
                } else {
                    "group.added"
                };
                return Err(invalid(
                    path,
                    "only in group.updated: a created group lists its `members`",
                ));
            }
        }
        EventType::GroupUpdated => {
            if group.members.is_some() {
                return Err(invalid(
                    "group.members",
                    "only in group.created: an update lists the members `added` and `removed`",
                ));
            }
        }
        _ => {
            if group.members.is_some() || !group.added.is_empty() || !group.removed.is_empty() {
                return Err(invalid("group", "a deleted group lists no members"));
            }
        }
    }
    for (name, members) in [
        ("group.members", group.members.as_mut()),
        ("group.added", Some(&mut group.added)),
        ("group.removed", Some(&mut group.removed)),
    ] {
        let Some(members) = members else { continue };
        for (index, member) in members.iter().enumerate() {
            let path = format!("{name}[{index}]");
            check_identifier(&path, member)?;
            check_user_id(&path, member)?;
        }
        // A member listed twice is one member.
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        members.retain(|member| seen.insert(member.clone()));
    }
    if let Some(both) = group.added.iter().find(|member| group.removed.contains(member)) {
        return Err(DecodeError::InvalidField {
            path: "group.removed".into(),
            message: format!("member {both:?} is both added and removed"),
        });
    }
    Ok(data)
}

/// A user id may not look like a group's key.
fn check_user_id(path: &str, value: &str) -> Result<(), DecodeError> {
    if value.starts_with(GROUP_KEY_PREFIX) {
        return Err(DecodeError::InvalidField {
            path: path.into(),
            message: format!("user ids beginning with `{GROUP_KEY_PREFIX}` are reserved: group keys are `tenant/{GROUP_KEY_PREFIX}<group id>`"),
        });
    }
    Ok(())
}

/// Identifiers travel into Kafka keys, URLs, filters and queries. Connectors escape
/// them for each target; here we refuse what no target could take: empty values,
/// control characters and absurd lengths.
fn check_identifier(path: &str, value: &str) -> Result<(), DecodeError> {
    let problem = if value.trim().is_empty() {
        Some("must not be empty".to_string())
    } else if value.len() > MAX_IDENTIFIER_LENGTH {
        Some(format!("must be at most {MAX_IDENTIFIER_LENGTH} bytes"))
    } else if value.chars().any(char::is_control) {
        Some("must not contain control characters".to_string())
    } else {
        None
    };
    match problem {
        Some(message) => Err(DecodeError::InvalidField {
            path: path.into(),
            message,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn structured() -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": "evt-1",
            "source": "/wso2is/carbon.super",
            "type": "user.created",
            "data": {"tenant": "carbon.super", "user": {"id": "u-1", "userName": "alice"}}
        })
    }

    fn decode_json(document: &serde_json::Value) -> Result<Event, DecodeError> {
        decode(Some(document.to_string().as_bytes()), &[], LIMIT)
    }

    fn user_event(event: Event) -> UserEvent {
        match event {
            Event::User(event) => event,
            other => panic!("not a user event: {other:?}"),
        }
    }

    fn group_event(event: Event) -> GroupEvent {
        match event {
            Event::Group(event) => event,
            other => panic!("not a group event: {other:?}"),
        }
    }

    fn group(event_type: &str, group: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": "evt-g",
            "source": "/wso2is",
            "type": event_type,
            "data": {"tenant": "acme", "group": group}
        })
    }

    fn binary_headers() -> Vec<(String, Vec<u8>)> {
        [
            ("ce_specversion", "1.0"),
            ("ce_id", "evt-2"),
            ("ce_source", "/wso2is"),
            ("ce_type", "user.deleted"),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect()
    }

    #[test]
    fn structured_event_decodes() {
        let event = user_event(decode_json(&structured()).unwrap());
        assert_eq!(event.event_type, EventType::UserCreated);
        assert_eq!(event.key(), "carbon.super/u-1");
        assert_eq!(event.data.service_provider, None);
    }

    #[test]
    fn binary_event_decodes_from_headers() {
        let data = serde_json::json!({"tenant": "t", "user": {"id": "u-2", "userName": "bob"}});
        let event = user_event(decode(Some(data.to_string().as_bytes()), &binary_headers(), LIMIT).unwrap());
        assert_eq!(event.id, "evt-2");
        assert_eq!(event.event_type, EventType::UserDeleted);
        assert_eq!(event.data.user.user_name, "bob");
    }

    #[test]
    fn binary_event_without_id_header_names_the_header() {
        let data = serde_json::json!({"tenant": "t", "user": {"id": "u", "userName": "b"}});
        let headers: Vec<_> = binary_headers()
            .into_iter()
            .filter(|(name, _)| name != "ce_id")
            .collect();
        let error = decode(Some(data.to_string().as_bytes()), &headers, LIMIT).unwrap_err();
        assert_eq!(error, DecodeError::MissingAttribute { name: "ce_id".into() });
    }

    #[test]
    fn a_group_event_decodes_with_a_key_no_user_can_have() {
        let created = group_event(
            decode_json(&group(
                "group.created",
                serde_json::json!({"id": "g-1", "displayName": "Engineering", "members": ["u-1", "u-2", "u-1"]}),
            ))
            .unwrap(),
        );
        assert_eq!(created.key(), "acme/group:g-1");
        assert_eq!(
            created.data.group.members.as_deref(),
            Some(&["u-1".to_string(), "u-2".to_string()][..]),
            "a member listed twice is one member"
        );
        let mut reserved = structured();
        reserved["data"]["user"]["id"] = "group:g-1".into();
        let error = decode_json(&reserved).unwrap_err();
        assert_eq!(error.reason(), "invalid_field");
        assert!(error.to_string().contains("reserved"), "{error}");
    }

    #[test]
    fn group_events_carry_only_the_member_lists_of_their_type() {
        let cases = [
            (
                "group.created",
                serde_json::json!({"id": "g", "displayName": "G", "added": ["u"]}),
                "group.added",
            ),
            (
                "group.updated",
                serde_json::json!({"id": "g", "displayName": "G", "members": ["u"]}),
                "group.members",
            ),
            (
                "group.deleted",
                serde_json::json!({"id": "g", "displayName": "G", "removed": ["u"]}),
                "group",
            ),
            (
                "group.updated",
                serde_json::json!({"id": "g", "displayName": "G", "added": ["u"], "removed": ["u"]}),
                "group.removed",
            ),
            (
                "group.updated",
                serde_json::json!({"id": "g", "displayName": "G", "added": ["group:x"]}),
                "group.added[0]",
            ),
            ("group.created", serde_json::json!({"id": "g"}), "group.displayName"),
        ];
        for (event_type, body, path) in cases {
            match decode_json(&group(event_type, body.clone())).unwrap_err() {
                DecodeError::InvalidField { path: found, .. } | DecodeError::MissingField { path: found } => {
                    assert_eq!(found, path, "{event_type} {body}")
                }
                other => panic!("{event_type} {body}: {other}"),
            }
        }
    }

    #[test]
    fn each_kind_of_bad_input_has_its_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "invalid_json"),
            (vec![0x7b, 0xff, 0xfe, 0x7d], "invalid_utf8"),
            (Vec::new(), "empty_value"),
            (vec![b' '; LIMIT + 1], "oversized"),
        ];
        for (bytes, reason) in cases {
            assert_eq!(decode(Some(&bytes), &[], LIMIT).unwrap_err().reason(), reason);
        }
        let mut wrong_version = structured();
        wrong_version["specversion"] = "0.3".into();
        assert_eq!(
            decode_json(&wrong_version).unwrap_err().reason(),
            "unsupported_specversion"
        );
        let mut unknown_type = structured();
        unknown_type["type"] = "user.teleported".into();
        assert_eq!(decode_json(&unknown_type).unwrap_err().reason(), "unknown_event_type");
        let mut no_tenant = structured();
        no_tenant["data"].as_object_mut().unwrap().remove("tenant");
        assert_eq!(
            decode_json(&no_tenant).unwrap_err(),
            DecodeError::MissingField { path: "tenant".into() }
        );
        let mut wrong_type = structured();
        wrong_type["data"]["user"]["active"] = "yes".into();
        let error = decode_json(&wrong_type).unwrap_err();
        assert_eq!(error.reason(), "invalid_field");
        assert!(error.to_string().contains("user.active"), "{error}");
        let mut control = structured();
        control["data"]["user"]["id"] = "u\n1".into();
        assert_eq!(decode_json(&control).unwrap_err().reason(), "invalid_field");
    }

    #[test]
    fn every_reason_is_listed() {
        let samples = [
            DecodeError::Oversized { size: 2, limit: 1 },
            DecodeError::EmptyValue,
            DecodeError::InvalidUtf8 { valid_up_to: 0 },
            DecodeError::InvalidJson { message: String::new() },
            DecodeError::InvalidHeader { name: String::new() },
            DecodeError::MissingAttribute { name: String::new() },
            DecodeError::InvalidAttribute {
                name: String::new(),
                message: String::new(),
            },
            DecodeError::UnsupportedSpecVersion { version: String::new() },
            DecodeError::UnknownEventType {
                event_type: String::new(),
            },
            DecodeError::UnsupportedContentType {
                content_type: String::new(),
            },
            DecodeError::MissingField { path: String::new() },
            DecodeError::InvalidField {
                path: String::new(),
                message: String::new(),
            },
            DecodeError::WrongKey {
                expected: String::new(),
                found: String::new(),
            },
        ];
        let reasons: Vec<&str> = samples.iter().map(DecodeError::reason).collect();
        assert_eq!(reasons, DecodeError::REASONS);
    }

    #[test]
    fn reply_route_needs_both_headers() {
        let both = vec![
            ("correlation_id".to_string(), b"c-1".to_vec()),
            ("reply_to".to_string(), b"replies".to_vec()),
        ];
        assert_eq!(
            reply_route(&both).unwrap(),
            Some(ReplyRoute {
                correlation_id: "c-1".into(),
                reply_to: "replies".into()
            })
        );
        assert_eq!(reply_route(&both[..1]).unwrap(), None);
    }
}
