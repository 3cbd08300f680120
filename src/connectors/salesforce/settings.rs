//! The `type = "salesforce"` connector's settings, their defaults and their checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::connectors::delivery::DeliverySettings;
use crate::connectors::http::HttpSettings;
use crate::connectors::naming::AccountNamePattern;
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSettings {
    /// `https://login.salesforce.com`, `https://test.salesforce.com` or a My Domain URL.
    #[serde(default = "default_salesforce_login_url")]
    pub login_url: Url,
    #[serde(default = "default_salesforce_api_version")]
    pub api_version: String,
    pub auth: SalesforceAuth,
    #[serde(default)]
    pub username: AccountNamePattern,
    /// Appended to usernames that do not already end with it (they must be email-shaped).
    pub provisioning_domain: String,
    pub profile_id: String,
    #[serde(default = "default_time_zone")]
    pub time_zone_sid_key: String,
    #[serde(default = "default_locale")]
    pub locale_sid_key: String,
    #[serde(default = "default_email_encoding")]
    pub email_encoding_key: String,
    #[serde(default = "default_locale")]
    pub language_locale_key: String,
    /// Salesforce field → event path, added to or overriding the defaults.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// On deactivation also rename `Username` so it can be reused (as WSO2 does).
    #[serde(default)]
    pub free_username_on_deactivate: bool,
    /// Group → the API Name of the permission set its members are assigned. A key is a
    /// group's id or its displayName, exactly (case-sensitive); the id wins when both
    /// have an entry. Groups not listed are skipped. Permission sets are never created
    /// or deleted, only assigned and unassigned.
    #[serde(default)]
    pub permission_sets: BTreeMap<String, String>,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "grant", rename_all = "snake_case", deny_unknown_fields)]
pub enum SalesforceAuth {
    /// Recommended: an External Client App with a run-as integration user.
    ClientCredentials { client_id: String, client_secret: Secret },
    /// RS256 assertion signed with the app's certificate key.
    JwtBearer {
        client_id: String,
        username: String,
        private_key: Secret,
    },
    /// Legacy, for WSO2 parity. Salesforce advises against it.
    Password {
        client_id: String,
        client_secret: Secret,
        username: String,
        password: Secret,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        security_token: Option<Secret>,
    },
}

impl SalesforceSettings {
    /// Problems serde cannot see, each with its full key under `key`.
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        let version = self.api_version.trim_start_matches('v');
        if !self.api_version.starts_with('v') || version.parse::<f32>().is_err() {
            problem(format!("{key}.api_version"), "must look like v62.0".into());
        }
        if self.provisioning_domain.is_empty() || self.provisioning_domain.contains('@') {
            problem(
                format!("{key}.provisioning_domain"),
                "must be a bare domain such as example.com".into(),
            );
        }
        self.username.check(&format!("{key}.username"), problem);
        let mut managed_by: BTreeMap<&str, &str> = BTreeMap::new();
        for (group, permission_set) in &self.permission_sets {
            // A mapped permission set's assignments follow its group (a group's delete
            // removes them all), so two groups cannot share one.
            if let Some(other) = managed_by.insert(permission_set, group) {
                problem(
                    format!("{key}.permission_sets.{group}"),
                    format!("permission set `{permission_set}` is mapped from group `{other}` already; each permission set follows one group"),
                );
            }
            if !is_api_name(permission_set) {
                problem(
                    format!("{key}.permission_sets.{group}"),
                    format!("`{permission_set}` is not a permission set API Name (letters, digits and underscores, starting with a letter); is it the Label?"),
                );
            }
        }
    }
}

/// A Salesforce API Name: a letter, then letters, digits and underscores (`__` only
/// after a managed package's namespace prefix, which we do not police).
fn is_api_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn default_salesforce_login_url() -> Url {
    Url::parse("https://login.salesforce.com").expect("constant URL")
}
fn default_salesforce_api_version() -> String {
    "v62.0".into()
}
fn default_time_zone() -> String {
    "America/Los_Angeles".into()
}
fn default_locale() -> String {
    "en_US".into()
}
fn default_email_encoding() -> String {
    "UTF-8".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permission_set_follows_one_group_only() {
        let settings: SalesforceSettings = toml::from_str(
            r#"
            login_url = "https://login.example.com"
            provisioning_domain = "crm.example.com"
            profile_id = "00e000000000001AAA"
            permission_sets = { "Sales" = "Sales_Access", "Sales EMEA" = "Sales_Access" }
            [auth]
            grant = "client_credentials"
            client_id = "app"
            client_secret = "secret"
            "#,
        )
        .unwrap();
        let mut problems = Vec::new();
        settings.check("connectors.crm", &mut |key, message| problems.push((key, message)));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "connectors.crm.permission_sets.Sales EMEA");
        assert!(problems[0].1.contains("mapped from group `Sales`"), "{problems:?}");
    }

    #[test]
    fn permission_sets_are_named_by_api_name() {
        assert!(is_api_name("Sales_Cloud_User"));
        assert!(is_api_name("ns__Analyst"));
        assert!(!is_api_name("Sales Cloud User"), "a Label, not an API Name");
        assert!(!is_api_name("_Hidden"));
        assert!(!is_api_name(""));
        assert!(!is_api_name("x' OR Name != 'y"));
    }
}
