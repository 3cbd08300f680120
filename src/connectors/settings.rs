//! `[connectors.<name>]`: the tagged enum of connector types. Each type's settings live
//! with its connector (`scim/settings.rs`, `google/settings.rs`, `salesforce/settings.rs`);
//! the parts every type shares are `delivery.rs` and `http.rs`.

use serde::{Deserialize, Serialize};

use crate::connectors::delivery::DeliverySettings;
use crate::connectors::google::settings::GoogleSettings;
use crate::connectors::http::HttpSettings;
use crate::connectors::salesforce::settings::SalesforceSettings;
use crate::connectors::scim::settings::Scim2Settings;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorSettings {
    Scim2(Scim2Settings),
    Google(GoogleSettings),
    Salesforce(SalesforceSettings),
}

impl ConnectorSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorSettings::Scim2(_) => "scim2",
            ConnectorSettings::Google(_) => "google",
            ConnectorSettings::Salesforce(_) => "salesforce",
        }
    }

    pub fn delivery(&self) -> &DeliverySettings {
        match self {
            ConnectorSettings::Scim2(settings) => &settings.delivery,
            ConnectorSettings::Google(settings) => &settings.delivery,
            ConnectorSettings::Salesforce(settings) => &settings.delivery,
        }
    }

    pub fn http(&self) -> &HttpSettings {
        match self {
            ConnectorSettings::Scim2(settings) => &settings.http,
            ConnectorSettings::Google(settings) => &settings.http,
            ConnectorSettings::Salesforce(settings) => &settings.http,
        }
    }

    /// Every problem serde cannot see in this connector's settings, each reported with
    /// its full key under `key` (e.g. `connectors.directory`).
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        self.delivery().check(&format!("{key}.delivery"), problem);
        match self {
            ConnectorSettings::Scim2(settings) => settings.check(key, problem),
            ConnectorSettings::Google(settings) => settings.check(key, problem),
            ConnectorSettings::Salesforce(settings) => settings.check(key, problem),
        }
    }
}
