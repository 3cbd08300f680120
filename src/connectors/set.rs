//! Every configured connector, by name, each with the gate and retry policy it runs under.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::connectors::delivery::DeliverySettings;
use crate::connectors::gate::Gate;
use crate::connectors::members::MembershipBatcher;
use crate::connectors::settings::ConnectorSettings;
use crate::connectors::{google, salesforce, scim, BuildError, Connector};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;

/// A connector with the limits and retry policy it runs under.
pub struct ConnectorHandle {
    pub name: String,
    pub connector: Arc<dyn Connector>,
    /// Circuit breaker, slow-down, rate limit and concurrency cap; passed per attempt,
    /// never held across backoff sleeps.
    pub gate: Arc<Gate>,
    pub retry: RetryPolicy,
    /// Membership operations of one group, batched into shared requests.
    pub members: MembershipBatcher,
}

/// Every configured connector, by name.
#[derive(Default, Clone)]
pub struct ConnectorSet {
    handles: BTreeMap<String, Arc<ConnectorHandle>>,
}

impl ConnectorSet {
    /// Builds every connector of `[connectors]`.
    pub fn from_settings(
        connectors: &BTreeMap<String, ConnectorSettings>,
        metrics: &Arc<Metrics>,
    ) -> Result<ConnectorSet, BuildError> {
        let mut set = ConnectorSet::default();
        for (name, connector_settings) in connectors {
            let delivery = connector_settings.delivery();
            let gate = Arc::new(Gate::new(name, delivery, Some(metrics.clone())));
            let connector = build_connector(name, connector_settings, metrics, &gate)?;
            set.insert_with_gate(name, connector, gate, delivery, Some(metrics.clone()));
        }
        Ok(set)
    }

    /// Adds (or replaces) a connector. Tests use it to plug in doubles.
    pub fn insert(&mut self, name: &str, connector: Arc<dyn Connector>, delivery: &DeliverySettings) {
        let gate = Arc::new(Gate::new(name, delivery, None));
        self.insert_with_gate(name, connector, gate, delivery, None);
    }

    fn insert_with_gate(
        &mut self,
        name: &str,
        connector: Arc<dyn Connector>,
        gate: Arc<Gate>,
        delivery: &DeliverySettings,
        metrics: Option<Arc<Metrics>>,
    ) {
        let members = MembershipBatcher::new(name, connector.clone(), gate.clone(), metrics);
        self.handles.insert(
            name.to_string(),
            Arc::new(ConnectorHandle {
                name: name.to_string(),
                connector,
                gate,
                retry: delivery.retry_policy(),
                members,
            }),
        );
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ConnectorHandle>> {
        self.handles.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handles.keys().map(String::as_str)
    }
}

fn build_connector(
    name: &str,
    settings: &ConnectorSettings,
    metrics: &Arc<Metrics>,
    gate: &Arc<Gate>,
) -> Result<Arc<dyn Connector>, BuildError> {
    match settings {
        ConnectorSettings::Scim2(scim) => scim::build(name, scim),
        ConnectorSettings::Google(google) => google::build(name, google),
        ConnectorSettings::Salesforce(salesforce) => {
            salesforce::build(name, salesforce, metrics.clone(), Some(gate.clone()))
        }
    }
}
