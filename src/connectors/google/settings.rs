//! The `type = "google"` connector's settings, their defaults and their checks.

use serde::{Deserialize, Serialize};
use url::Url;

use crate::connectors::delivery::DeliverySettings;
use crate::connectors::http::HttpSettings;
use crate::connectors::naming::{AccountNamePattern, GroupEmailPattern};
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleSettings {
    /// The Workspace primary domain; every `primaryEmail` ends with `@domain`.
    pub domain: String,
    /// Service-account key JSON (Google's format); usually `service_account_key_file`.
    pub service_account_key: Secret,
    /// Admin user the service account impersonates (the JWT `sub`).
    pub admin_email: String,
    /// The scopes of the token for the users API.
    #[serde(default = "default_google_scopes")]
    pub scopes: Vec<String>,
    /// The scopes of the token for the groups and members APIs. A separate token, asked
    /// for at the first group operation only, so a domain-wide delegation that grants
    /// just the user scope keeps provisioning users (Google refuses a token request if
    /// any one scope in it is not delegated).
    #[serde(default = "default_google_group_scopes")]
    pub group_scopes: Vec<String>,
    #[serde(default = "default_google_api_base_url")]
    pub api_base_url: Url,
    /// Defaults to the key's `token_uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<Url>,
    #[serde(default)]
    pub primary_email: AccountNamePattern,
    /// The address of a group: `{GN}` its display name as a slug, `{GID}` its source
    /// id, `{TD}` the tenant; `@domain` appended. Set when the group is created and kept
    /// on renames, as Google keeps a group's address when its name changes.
    #[serde(default)]
    pub group_email: GroupEmailPattern,
    /// Used when the event has no given/family name (Google requires both);
    /// `{UN}` stands for the user name.
    #[serde(default = "default_name_fallback")]
    pub given_name_fallback: String,
    #[serde(default = "default_name_fallback")]
    pub family_name_fallback: String,
    #[serde(default = "default_org_unit_path")]
    pub org_unit_path: String,
    #[serde(default)]
    pub change_password_at_next_login: bool,
    #[serde(default)]
    pub deprovision: GoogleDeprovision,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GoogleDeprovision {
    #[default]
    Delete,
    Suspend,
}

impl GoogleSettings {
    /// Problems serde cannot see, each with its full key under `key`.
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if self.domain.is_empty() || self.domain.contains('@') {
            problem(
                format!("{key}.domain"),
                "must be a bare domain such as example.com".into(),
            );
        }
        if !self.admin_email.contains('@') {
            problem(format!("{key}.admin_email"), "must be an email address".into());
        }
        self.primary_email.check(&format!("{key}.primary_email"), problem);
        self.group_email.check(&format!("{key}.group_email"), problem);
    }
}

fn default_google_scopes() -> Vec<String> {
    vec!["https://www.googleapis.com/auth/admin.directory.user".into()]
}
fn default_google_group_scopes() -> Vec<String> {
    vec!["https://www.googleapis.com/auth/admin.directory.group".into()]
}
fn default_google_api_base_url() -> Url {
    Url::parse("https://admin.googleapis.com").expect("constant URL")
}
fn default_name_fallback() -> String {
    "{UN}".into()
}
fn default_org_unit_path() -> String {
    "/".into()
}
