//! The service's own words, apart from any wire format: the [`User`] being provisioned,
//! the [`Operation`] a connector is asked to apply ([`UserChange`]), and the
//! [`Outcome`] it reports.
//!
//! Connectors depend on this module, not on the CloudEvents envelope (`event.rs`) or
//! the result records (`result.rs`); those two are the wire contracts and re-export
//! what they carry from here. This module imports nothing from the crate.

pub mod version;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a connector is asked to do: apply one operation to one user of one tenant.
#[derive(Debug, Clone, Copy)]
pub struct UserChange<'a> {
    pub operation: Operation,
    /// The id of the event that asked for it (for logs and call records).
    pub event_id: &'a str,
    /// Tenant domain, e.g. `carbon.super` (`{TD}` in account-name patterns).
    pub tenant: &'a str,
    /// The federated identity provider, for JIT-provisioned users (`{IDP}`).
    pub identity_provider: Option<&'a str>,
    pub user: &'a User,
    /// The target's id for this user, as the provisioning state remembers it. Update,
    /// delete and deactivate go by it; a connector whose target no longer has it
    /// searches instead.
    pub remote_id: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    /// The account already existed (409 on create) and was taken over and converged.
    Adopted,
    Updated,
    Deleted,
    Deactivated,
    /// Nothing to delete: the target had no such account.
    AlreadyAbsent,
    /// The binding did not apply (rule false, JIT not enabled, …).
    Skipped,
    /// Not sent: a newer event for the user was already applied on this connector.
    Stale,
    /// Accepted durably and applied later: the connector is parked (its work waits in
    /// its retry topic) or did not finish within the reply deadline. Only in replies
    /// and queued notices; a complete result always has a final outcome.
    Queued,
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Created,
        Outcome::Adopted,
        Outcome::Updated,
        Outcome::Deleted,
        Outcome::Deactivated,
        Outcome::AlreadyAbsent,
        Outcome::Skipped,
        Outcome::Stale,
        Outcome::Queued,
        Outcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Adopted => "adopted",
            Outcome::Updated => "updated",
            Outcome::Deleted => "deleted",
            Outcome::Deactivated => "deactivated",
            Outcome::AlreadyAbsent => "already_absent",
            Outcome::Skipped => "skipped",
            Outcome::Stale => "stale",
            Outcome::Queued => "queued",
            Outcome::Failed => "failed",
        }
    }
}

/// A user as the identity platform describes it. The serde names are the event's
/// (`data.user`), which attribute mappings (`attributes`, `fields`) address by path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Stable source id; sent to targets as `externalId` / `FederationIdentifier`.
    pub id: String,
    #[serde(rename = "userName")]
    pub user_name: String,
    #[serde(rename = "userStoreDomain", default, skip_serializing_if = "Option::is_none")]
    pub user_store_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<Email>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Other claims, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, serde_json::Value>,
}

impl User {
    /// The primary email, else the first one.
    pub fn primary_email(&self) -> Option<&str> {
        self.emails
            .iter()
            .find(|email| email.primary == Some(true))
            .or_else(|| self.emails.first())
            .map(|email| email.value.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Name {
    #[serde(rename = "givenName", default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(rename = "familyName", default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Email {
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<bool>,
}
