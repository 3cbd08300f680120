//! The service's own words, apart from any wire format: the [`User`] and [`Group`]
//! being provisioned, the [`Operation`] a connector is asked to apply ([`UserChange`],
//! [`GroupChange`], [`MembersChange`]), and the [`Outcome`] it reports.
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

/// What a connector is asked to do with one group: create (or adopt) it, update it
/// (rename), or delete it. Its members are changed separately ([`MembersChange`]).
#[derive(Debug, Clone, Copy)]
pub struct GroupChange<'a> {
    pub operation: Operation,
    pub event_id: &'a str,
    pub tenant: &'a str,
    /// The group's stable source id (`externalId` where the target has one).
    pub group_id: &'a str,
    pub display_name: &'a str,
    /// The target's id for this group, as the provisioning state remembers it.
    pub remote_id: Option<&'a str>,
}

/// Members added to or removed from one group on one target, in one request where the
/// target allows it (up to the connector's [`crate::connectors::Connector`] limit).
#[derive(Debug, Clone, Copy)]
pub struct MembersChange<'a> {
    pub action: MemberAction,
    pub tenant: &'a str,
    pub group: GroupRef<'a>,
    pub members: &'a [MemberRef],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberAction {
    Add,
    Remove,
}

impl MemberAction {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberAction::Add => "add",
            MemberAction::Remove => "remove",
        }
    }
}

/// A group as a membership call names it.
#[derive(Debug, Clone, Copy)]
pub struct GroupRef<'a> {
    pub group_id: &'a str,
    pub display_name: &'a str,
    /// The target's id for the group (for Salesforce: the permission set's id).
    pub remote_id: &'a str,
}

/// A member as a membership call names it: the target's id for the user, and the
/// source ids for messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberRef {
    pub user_id: String,
    pub remote_id: String,
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
    /// Members were added to a group (how many: the result's `members_added`).
    MembersAdded,
    /// Members were taken out of a group (how many: the result's `members_removed`).
    MembersRemoved,
    /// Accepted durably and applied later: the connector is parked (its work waits in
    /// its retry topic) or did not finish within the reply deadline. Only in replies
    /// and queued notices; a complete result always has a final outcome.
    Queued,
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Created,
        Outcome::Adopted,
        Outcome::Updated,
        Outcome::Deleted,
        Outcome::Deactivated,
        Outcome::AlreadyAbsent,
        Outcome::Skipped,
        Outcome::Stale,
        Outcome::MembersAdded,
        Outcome::MembersRemoved,
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
            Outcome::MembersAdded => "members_added",
            Outcome::MembersRemoved => "members_removed",
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

/// A group as the identity platform describes it (`data.group`). A create carries its
/// full member list; an update its rename and the members added and removed; a delete
/// only its id and name. Members are user ids of the same tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    #[serde(rename = "displayName")]
    pub display_name: String,
    /// Every member (`group.created` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
    /// Members added (`group.updated` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    /// Members removed (`group.updated` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
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
