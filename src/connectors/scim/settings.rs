//! The `type = "scim2"` connector's settings, their defaults and their checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::connectors::delivery::DeliverySettings;
use crate::connectors::http::HttpSettings;
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scim2Settings {
    /// SCIM base URL; `/Users` and `/Groups` are appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<Url>,
    /// Explicit Users endpoint (WSO2 `scim2-user-ep`); overrides `base_url` + `/Users`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_url: Option<Url>,
    /// Explicit Groups endpoint (WSO2 `scim2-group-ep`); overrides `base_url` + `/Groups`
    /// (or, with only `users_url`, its sibling `/Groups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_url: Option<Url>,
    /// The most members one membership PATCH adds or removes; larger changes are sent in
    /// batches of this size. AWS IAM Identity Center refuses more than 100.
    #[serde(default = "default_max_members_per_request")]
    pub max_members_per_request: usize,
    #[serde(default)]
    pub auth: ScimAuth,
    /// `strip` sends `alice` for `PRIMARY/alice`; `keep` sends `PRIMARY/alice`.
    #[serde(default)]
    pub user_store_domain: UserStoreDomainHandling,
    #[serde(default)]
    pub password: PasswordProvisioning,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_password: Option<Secret>,
    #[serde(default)]
    pub deprovision: ScimDeprovision,
    /// SCIM attribute path → event path (e.g. `"title" = "attributes.title"`), added to
    /// or overriding the default mapping.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_max_members_per_request() -> usize {
    100
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScimAuth {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
    ApiKey {
        header: String,
        api_key: Secret,
    },
    /// OAuth 2.0 client credentials; the token is cached until shortly before expiry.
    Oauth2 {
        token_url: Url,
        client_id: String,
        client_secret: Secret,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStoreDomainHandling {
    #[default]
    Strip,
    Keep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PasswordProvisioning {
    #[default]
    None,
    Default,
    Random,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScimDeprovision {
    #[default]
    Delete,
    Deactivate,
}

impl Scim2Settings {
    /// Problems serde cannot see, each with its full key under `key`.
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if self.base_url.is_none() && self.users_url.is_none() {
            problem(format!("{key}.base_url"), "set base_url or users_url".into());
        }
        if self.password == PasswordProvisioning::Default && self.default_password.is_none() {
            problem(
                format!("{key}.default_password"),
                "is required when password = \"default\"".into(),
            );
        }
        if self.max_members_per_request == 0 {
            problem(format!("{key}.max_members_per_request"), "must be at least 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(settings: serde_json::Value) -> Vec<(String, String)> {
        let settings: Scim2Settings = serde_json::from_value(settings).expect("valid SCIM settings");
        let mut problems = Vec::new();
        settings.check("connectors.directory", &mut |key, message| {
            problems.push((key, message))
        });
        problems
    }

    #[test]
    fn max_members_per_request_defaults_to_100_and_must_be_at_least_1() {
        let settings: Scim2Settings =
            serde_json::from_value(serde_json::json!({"base_url": "http://127.0.0.1:1/scim"})).unwrap();
        assert_eq!(settings.max_members_per_request, 100);
        assert!(problems(serde_json::json!({"base_url": "http://127.0.0.1:1/scim"})).is_empty());
        assert_eq!(
            problems(serde_json::json!({"base_url": "http://127.0.0.1:1/scim", "max_members_per_request": 0})),
            vec![(
                "connectors.directory.max_members_per_request".to_string(),
                "must be at least 1".to_string()
            )]
        );
    }
}
