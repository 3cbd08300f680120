//! SCIM 2.0 (RFC 7643/7644) Users, and Groups (`groups.rs`).
//!
//! Every operation converges instead of assuming: create adopts an existing account on
//! a uniqueness conflict, update of a user the target has never seen creates it, delete
//! of a missing user is `already_absent`. Updates PATCH only the mapped attributes when
//! the server advertises PATCH; otherwise they read the resource, overlay the mapped
//! attributes and PUT it back, so attributes we do not manage are never wiped.
//!
//! Users and groups share the plumbing: lookups (`Lookup`), reads, writes with
//! `If-Match` and deletes go through an `Endpoint`.

mod groups;
pub mod settings;

use std::sync::Arc;

use futures::future::BoxFuture;
use rand::distr::{Distribution, Uniform};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, ETAG, IF_MATCH};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::OnceCell;
use url::Url;

use crate::connectors::http::{build_client, json_body, status_error};
use crate::connectors::oauth::{request_token, send_authorised, Target, Token, TokenCache};
use crate::connectors::scim::settings::{
    PasswordProvisioning, Scim2Settings, ScimAuth, ScimDeprovision, UserStoreDomainHandling,
};
use crate::connectors::{deleted_or_absent, Applied, BuildError, Connector, ConnectorError};
use crate::domain::{GroupChange, MembersChange, Operation, Outcome, User, UserChange};
use crate::secret::Secret;

const SCIM_JSON: &str = "application/scim+json";
const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// What the server advertises in `/ServiceProviderConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub patch: bool,
    pub filter: bool,
    pub etag: bool,
}

impl Capabilities {
    /// Assumed when the server has no readable `/ServiceProviderConfig`: no PATCH (PUT
    /// is always allowed), filtering (lookups need it), no ETags.
    const FALLBACK: Capabilities = Capabilities {
        patch: false,
        filter: true,
        etag: false,
    };
}

/// Resources read per page when a target that cannot filter is scanned.
const LISTING_PAGE: u64 = 100;
/// The most resources such a scan reads before giving up.
const MAX_LISTING: u64 = 100_000;

/// A user or group as found on the target.
struct RemoteResource {
    id: String,
    version: Option<String>,
    /// As read. A group found by a lookup has no `members` ([`Endpoint`]), so only a
    /// group read by id ([`ScimConnector::get_resource`]) may be PUT back.
    resource: Value,
}

/// A resource endpoint: `/Users` or `/Groups`.
struct Endpoint {
    url: Url,
    /// `user` or `group`, for messages.
    noun: &'static str,
    /// Attributes a lookup leaves out (`excludedAttributes`): a group's `members` can
    /// run to thousands, and a lookup needs only ids and names. Azure AD's provisioning
    /// asks the same way, so servers built for it accept it.
    excluded_from_lookups: Option<&'static str>,
}

impl Endpoint {
    fn resource_url(&self, id: &str) -> Url {
        let mut url = self.url.clone();
        // Pushed as one segment, so an id with `/` or `?` cannot change the path.
        url.path_segments_mut()
            .expect("resource endpoint URLs are hierarchical")
            .push(id);
        url
    }

    /// The query of a lookup or listing: `parameters`, and what lookups leave out.
    fn lookup_query<'a>(&self, parameters: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
        let mut query = parameters.to_vec();
        if let Some(excluded) = self.excluded_from_lookups {
            query.push(("excludedAttributes", excluded.to_string()));
        }
        query
    }
}

/// One way to look a resource up: `attribute eq value`.
struct Lookup<'a> {
    attribute: &'static str,
    value: &'a str,
    /// RFC 7643 `caseExact`: `externalId` is; `userName` and `displayName` are not.
    case_exact: bool,
}

impl Lookup<'_> {
    fn filter(&self) -> String {
        format!("{} eq {}", self.attribute, filter_literal(self.value))
    }

    /// Whether `resource` really matches: a server that ignores `filter` answers with
    /// every resource.
    fn matches(&self, resource: &Value) -> bool {
        resource
            .get(self.attribute)
            .and_then(Value::as_str)
            .is_some_and(|found| {
                if self.case_exact {
                    found == self.value
                } else {
                    equal_ignoring_case(found, self.value)
                }
            })
    }
}

/// What filtered lookups found.
enum Filtered {
    Found(RemoteResource),
    NotFound,
    /// The server refused to filter (400 invalidFilter, 403, 501).
    FilteringFailed(ConnectorError),
}

pub struct ScimConnector {
    name: String,
    http: reqwest::Client,
    users: Endpoint,
    groups: Endpoint,
    service_provider_config_url: Url,
    settings: Scim2Settings,
    capabilities: OnceCell<Capabilities>,
    tokens: TokenCache,
}

impl ScimConnector {
    pub fn new(name: &str, settings: &Scim2Settings) -> Result<ScimConnector, BuildError> {
        let invalid = |message: String| BuildError::Invalid {
            name: name.to_string(),
            message,
        };
        let users_url = match (&settings.users_url, &settings.base_url) {
            (Some(users_url), _) => users_url.clone(),
            (None, Some(base_url)) => join_path(base_url, "Users"),
            (None, None) => return Err(invalid("set base_url or users_url".into())),
        };
        // Without base_url, the other endpoints are the Users endpoint's siblings.
        let base_url = match &settings.base_url {
            Some(base_url) => base_url.clone(),
            None => {
                let mut base = users_url.clone();
                base.path_segments_mut()
                    .map_err(|_| invalid("users_url cannot be a base URL".into()))?
                    .pop();
                base
            }
        };
        let groups_url = match &settings.groups_url {
            Some(groups_url) => groups_url.clone(),
            None => join_path(&base_url, "Groups"),
        };
        if groups_url.cannot_be_a_base() {
            return Err(invalid("groups_url cannot be a base URL".into()));
        }
        Ok(ScimConnector {
            name: name.to_string(),
            http: build_client(name, &settings.http)?,
            users: Endpoint {
                url: users_url,
                noun: "user",
                excluded_from_lookups: None,
            },
            groups: Endpoint {
                url: groups_url,
                noun: "group",
                excluded_from_lookups: Some("members"),
            },
            service_provider_config_url: join_path(&base_url, "ServiceProviderConfig"),
            settings: settings.clone(),
            capabilities: OnceCell::new(),
            tokens: TokenCache::default(),
        })
    }

    async fn apply_change(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        let user = change.user;
        match change.operation {
            Operation::Create => self.create(user).await,
            Operation::Update => {
                if let Some(id) = change.remote_id {
                    if let Some(id) = self
                        .update_by_id(&self.users, id, &self.desired_attributes(user))
                        .await?
                    {
                        return Ok(Applied {
                            outcome: Outcome::Updated,
                            remote_id: Some(id),
                        });
                    }
                }
                match self.find_user(user).await? {
                    Some(remote) => self.converge(remote, user).await.map(|id| Applied {
                        outcome: Outcome::Updated,
                        remote_id: Some(id),
                    }),
                    // WSO2 turns an update of a never-provisioned user into a create; so do we.
                    None => self.create(user).await,
                }
            }
            Operation::Delete => self.delete(user, change.remote_id).await,
        }
    }

    /// Replaces `attributes` on the resource the provisioning state remembers as `id`:
    /// one PATCH when the target takes PATCH without ETags, else a read and a write.
    /// Returns its id, or `None` when the target no longer has it (then the caller
    /// forgets it and searches).
    async fn update_by_id(
        &self,
        endpoint: &Endpoint,
        id: &str,
        attributes: &[(String, Value)],
    ) -> Result<Option<String>, ConnectorError> {
        let capabilities = self.capabilities().await?;
        let remote = if capabilities.patch && !capabilities.etag {
            RemoteResource {
                id: id.to_string(),
                version: None,
                resource: Value::Null,
            }
        } else {
            match self.get_resource(endpoint, id).await? {
                Some(remote) => remote,
                None => return Ok(None),
            }
        };
        match self.write_attributes(endpoint, remote, attributes).await {
            Ok(id) => Ok(Some(id)),
            Err(ConnectorError::Rejected { status: 404, .. }) => {
                tracing::info!(connector = %self.name, remote_id = id, "The stored remote id is gone; searching.");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn create(&self, user: &User) -> Result<Applied, ConnectorError> {
        let mut resource = self.resource(&self.desired_attributes(user));
        if let Some(password) = self.password() {
            resource["password"] = Value::String(password.expose().to_string());
        }
        let url = self.users.url.clone();
        let response = self
            .send(
                |http| http.post(url.clone()).json(&resource),
                &[StatusCode::CREATED, StatusCode::OK],
            )
            .await;
        match response {
            Ok(body) => {
                let id = resource_id(&body)?;
                Ok(Applied {
                    outcome: Outcome::Created,
                    remote_id: Some(id),
                })
            }
            Err(error) if is_uniqueness_conflict(&error) => {
                // Someone (a previous attempt, an admin, another system) created it
                // first: find it and take it over.
                let Some(remote) = self.find_user(user).await? else {
                    return Err(ConnectorError::Conflict {
                        status: error.http_status(),
                        message: format!(
                            "the target reports the user exists ({error}) but neither externalId nor userName finds it"
                        ),
                    });
                };
                let id = self.converge(remote, user).await?;
                Ok(Applied {
                    outcome: Outcome::Adopted,
                    remote_id: Some(id),
                })
            }
            Err(error) => Err(error),
        }
    }

    async fn delete(&self, user: &User, mut known_id: Option<&str>) -> Result<Applied, ConnectorError> {
        if let (Some(id), ScimDeprovision::Delete) = (known_id, self.settings.deprovision) {
            // One request by the stored id, without reading the user first: a delete
            // needs no ETag (nothing of the user is kept), and the id is ours. A 404
            // means the id is gone: search, as below. A server that insists on
            // If-Match (412/428) gets the read and the conditional delete.
            match self.delete_resource(&self.users, id, None).await {
                Ok(_) => {
                    return Ok(Applied {
                        outcome: Outcome::Deleted,
                        remote_id: Some(id.to_string()),
                    })
                }
                Err(ConnectorError::Rejected { status: 404, .. }) => {
                    tracing::info!(connector = %self.name, remote_id = id, "The stored remote id is gone; searching.");
                    known_id = None;
                }
                Err(ConnectorError::Rejected { status: 412 | 428, .. }) => {}
                Err(error) => return Err(error),
            }
        }
        let known = match known_id {
            Some(id) => self.get_resource(&self.users, id).await?,
            None => None,
        };
        if known_id.is_some() && known.is_none() {
            tracing::info!(connector = %self.name, remote_id = known_id, "The stored remote id is gone; searching.");
        }
        let remote = match known {
            Some(remote) => Some(remote),
            None => self.find_user(user).await?,
        };
        let Some(remote) = remote else {
            return Ok(Applied {
                outcome: Outcome::AlreadyAbsent,
                remote_id: None,
            });
        };
        match self.settings.deprovision {
            ScimDeprovision::Delete => {
                let version = self.if_match(&remote).await?;
                let result = self.delete_resource(&self.users, &remote.id, version.as_deref()).await;
                deleted_or_absent(result, remote.id)
            }
            ScimDeprovision::Deactivate => {
                let id = self
                    .write_attributes(&self.users, remote, &[("active".to_string(), Value::Bool(false))])
                    .await?;
                Ok(Applied {
                    outcome: Outcome::Deactivated,
                    remote_id: Some(id),
                })
            }
        }
    }

    /// Brings an existing remote user in line with the event. Returns its id.
    async fn converge(&self, remote: RemoteResource, user: &User) -> Result<String, ConnectorError> {
        self.write_attributes(&self.users, remote, &self.desired_attributes(user))
            .await
    }

    /// Replaces `attributes` on the remote resource: PATCH when advertised, else
    /// read-modify-PUT of `remote` as read, which must then be whole (a user found by a
    /// lookup is; a group must be read by id).
    async fn write_attributes(
        &self,
        endpoint: &Endpoint,
        remote: RemoteResource,
        attributes: &[(String, Value)],
    ) -> Result<String, ConnectorError> {
        let capabilities = self.capabilities().await?;
        self.write_resource(endpoint, remote, |remote| {
            if capabilities.patch {
                let operations: Vec<Value> = attributes
                    .iter()
                    .map(|(path, value)| json!({"op": "replace", "path": path, "value": value}))
                    .collect();
                Some((Method::PATCH, patch_request(operations)))
            } else {
                let mut resource = remote.resource.clone();
                overlay(&mut resource, attributes);
                Some((Method::PUT, without_meta(resource)))
            }
        })
        .await
    }

    /// Sends the write that `request_for` builds from the resource as last read (`None`:
    /// nothing to write), with `If-Match` where ETags are advertised. A stale version
    /// (412) re-reads the resource once and builds the write again; a second 412 means
    /// someone else keeps writing it, and the call is retried later. Returns its id.
    async fn write_resource(
        &self,
        endpoint: &Endpoint,
        remote: RemoteResource,
        request_for: impl Fn(&RemoteResource) -> Option<(Method, Value)>,
    ) -> Result<String, ConnectorError> {
        let mut remote = remote;
        for attempt in 0..2 {
            let Some((method, body)) = request_for(&remote) else {
                return Ok(remote.id);
            };
            let url = endpoint.resource_url(&remote.id);
            let version = self.if_match(&remote).await?;
            let result = self
                .send(
                    |http| {
                        with_if_match(
                            http.request(method.clone(), url.clone()).json(&body),
                            version.as_deref(),
                        )
                    },
                    &[StatusCode::OK, StatusCode::NO_CONTENT],
                )
                .await;
            match result {
                Ok(_) => return Ok(remote.id),
                Err(ConnectorError::Rejected { status: 412, .. }) if attempt == 0 => {
                    let id = remote.id.clone();
                    remote = self
                        .get_resource(endpoint, &id)
                        .await?
                        .ok_or_else(|| ConnectorError::Rejected {
                            status: 404,
                            message: format!("{} {id} disappeared while being updated", endpoint.noun),
                        })?;
                }
                // Not Rejected: that would fail the event for good over a race that a
                // later attempt wins. Throttled (unlike Server) pauses nothing else and
                // does not count against the circuit breaker.
                Err(ConnectorError::Rejected { status: 412, message }) => {
                    return Err(ConnectorError::Throttled {
                        status: Some(412),
                        message: format!(
                            "{} {} changed again while being updated ({message}); trying again later",
                            endpoint.noun, remote.id
                        ),
                        retry_after: None,
                    })
                }
                Err(error) => return Err(error),
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    async fn if_match(&self, remote: &RemoteResource) -> Result<Option<String>, ConnectorError> {
        Ok(if self.capabilities().await?.etag {
            remote.version.clone()
        } else {
            None
        })
    }

    async fn delete_resource(
        &self,
        endpoint: &Endpoint,
        id: &str,
        version: Option<&str>,
    ) -> Result<Value, ConnectorError> {
        let url = endpoint.resource_url(id);
        self.send(
            |http| with_if_match(http.delete(url.clone()), version),
            &[StatusCode::NO_CONTENT, StatusCode::OK],
        )
        .await
    }

    /// Looks the user up by `externalId`, then by `userName`. Used when the provisioning
    /// state has no id for the user (provisioned before the state existed, or a crash
    /// between the call and the state write) or its id is gone.
    async fn find_user(&self, user: &User) -> Result<Option<RemoteResource>, ConnectorError> {
        let user_name = self.user_name(user);
        let lookups = [
            Lookup {
                attribute: "externalId",
                value: &user.id,
                case_exact: true,
            },
            Lookup {
                attribute: "userName",
                value: &user_name,
                case_exact: false,
            },
        ];
        self.find(&self.users, &lookups).await
    }

    /// The first resource the lookups find, tried in order.
    ///
    /// A filter is tried even when `/ServiceProviderConfig` says filtering is not
    /// supported: several servers ship that default while filtering works. When
    /// filtering fails outright, a paged listing is scanned instead.
    async fn find(
        &self,
        endpoint: &Endpoint,
        lookups: &[Lookup<'_>],
    ) -> Result<Option<RemoteResource>, ConnectorError> {
        let filter_error = match self.filter_lookup(endpoint, lookups).await? {
            Filtered::Found(remote) => return Ok(Some(remote)),
            Filtered::NotFound => return Ok(None),
            Filtered::FilteringFailed(error) => error,
        };
        tracing::info!(connector = %self.name, error = %filter_error, "Filtering failed; scanning the {} listing.", endpoint.noun);
        let matches = |resource: &Value| lookups.iter().any(|lookup| lookup.matches(resource));
        self.scan_listing(endpoint, &matches)
            .await
            .map_err(|error| ConnectorError::Rejected {
                status: error.http_status().unwrap_or(501),
                message: format!(
                    "the {} cannot be looked up: filtering failed ({filter_error}) and listing failed ({error})",
                    endpoint.noun
                ),
            })
    }

    /// The lookups as `filter` queries, in order, without falling back to a listing.
    async fn filter_lookup(&self, endpoint: &Endpoint, lookups: &[Lookup<'_>]) -> Result<Filtered, ConnectorError> {
        for lookup in lookups {
            let query = endpoint.lookup_query(&[("filter", lookup.filter())]);
            let url = endpoint.url.clone();
            let answer = self
                .send(|http| http.get(url.clone()).query(&query), &[StatusCode::OK])
                .await;
            let body = match answer {
                Ok(body) => body,
                // 400 invalidFilter, 403, 501: this server cannot filter after all.
                Err(error @ ConnectorError::Rejected { .. }) => return Ok(Filtered::FilteringFailed(error)),
                Err(error) => return Err(error),
            };
            let found = body.get("Resources").and_then(Value::as_array).into_iter().flatten();
            if let Some(resource) = found.into_iter().find(|resource| lookup.matches(resource)) {
                return remote_resource(resource).map(Filtered::Found);
            }
        }
        Ok(Filtered::NotFound)
    }

    /// Pages through the endpoint's listing (RFC 7644 §3.4.2.4) looking for a match,
    /// up to [`MAX_LISTING`] resources.
    async fn scan_listing(
        &self,
        endpoint: &Endpoint,
        matches: &impl Fn(&Value) -> bool,
    ) -> Result<Option<RemoteResource>, ConnectorError> {
        let mut start_index: u64 = 1;
        while start_index <= MAX_LISTING {
            let url = endpoint.url.clone();
            let page = endpoint.lookup_query(&[
                ("startIndex", start_index.to_string()),
                ("count", LISTING_PAGE.to_string()),
            ]);
            let body = self
                .send(|http| http.get(url.clone()).query(&page), &[StatusCode::OK])
                .await?;
            let resources = body
                .get("Resources")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if let Some(resource) = resources.iter().find(|resource| matches(resource)) {
                return remote_resource(resource).map(Some);
            }
            let total = body.get("totalResults").and_then(Value::as_u64).unwrap_or(0);
            let next = start_index + resources.len() as u64;
            if resources.is_empty() || next > total {
                return Ok(None);
            }
            start_index = next;
        }
        Err(ConnectorError::Rejected {
            status: 501,
            message: format!("the {} is not among the first {MAX_LISTING} listed", endpoint.noun),
        })
    }

    /// The whole resource by id, or `None` when the target has no such id.
    async fn get_resource(&self, endpoint: &Endpoint, id: &str) -> Result<Option<RemoteResource>, ConnectorError> {
        let url = endpoint.resource_url(id);
        match self.send_raw(|http| http.get(url.clone()), &[StatusCode::OK]).await {
            Ok((body, etag)) => Ok(Some(RemoteResource {
                id: id.to_string(),
                version: body
                    .pointer("/meta/version")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or(etag),
                resource: body,
            })),
            Err(ConnectorError::Rejected { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn capabilities(&self) -> Result<Capabilities, ConnectorError> {
        self.capabilities
            .get_or_try_init(|| async {
                let url = self.service_provider_config_url.clone();
                match self.send(|http| http.get(url.clone()), &[StatusCode::OK]).await {
                    Ok(config) => {
                        let supported = |feature: &str| {
                            config
                                .pointer(&format!("/{feature}/supported"))
                                .and_then(Value::as_bool)
                                .unwrap_or(false)
                        };
                        let capabilities = Capabilities {
                            patch: supported("patch"),
                            filter: supported("filter"),
                            etag: supported("etag"),
                        };
                        tracing::info!(connector = %self.name, ?capabilities, "Read SCIM ServiceProviderConfig.");
                        Ok(capabilities)
                    }
                    Err(error) if !error.is_retryable() => {
                        tracing::warn!(connector = %self.name, error = %error, "No readable ServiceProviderConfig; assuming PUT updates and filter lookups.");
                        Ok(Capabilities::FALLBACK)
                    }
                    Err(error) => Err(error),
                }
            })
            .await
            .copied()
    }

    /// Sends a request built by `build` (called again for a retry after a token
    /// renewal) and returns the JSON body of an expected status.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        expected: &[StatusCode],
    ) -> Result<Value, ConnectorError> {
        self.send_raw(build, expected).await.map(|(body, _)| body)
    }

    async fn send_raw(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        expected: &[StatusCode],
    ) -> Result<(Value, Option<String>), ConnectorError> {
        let request = |token: Option<&Token>| {
            let request = build(&self.http)
                .header(ACCEPT, SCIM_JSON)
                .header(CONTENT_TYPE, SCIM_JSON);
            self.authorize(request, token)
        };
        let response = send_authorised(&self.tokens, || self.token(), request, &Expecting(expected)).await?;
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        Ok((json_body(response).await?, etag))
    }

    async fn token(&self) -> Result<Option<Token>, ConnectorError> {
        let ScimAuth::Oauth2 {
            token_url,
            client_id,
            client_secret,
            scope,
        } = &self.settings.auth
        else {
            return Ok(None);
        };
        let token = self
            .tokens
            .get(|| async {
                let mut form = vec![("grant_type", "client_credentials")];
                if let Some(scope) = scope {
                    form.push(("scope", scope.as_str()));
                }
                request_token(&self.http, token_url.as_str(), &form, Some((client_id, client_secret))).await
            })
            .await?;
        Ok(Some(token))
    }

    /// Adds the configured static credentials; an OAuth token's bearer header is added
    /// by the send itself.
    fn authorize(&self, request: RequestBuilder, token: Option<&Token>) -> RequestBuilder {
        match (&self.settings.auth, token) {
            (_, Some(_)) => request,
            (ScimAuth::None, None) | (ScimAuth::Oauth2 { .. }, None) => request,
            (ScimAuth::Basic { username, password }, None) => request.basic_auth(username, Some(password.expose())),
            (ScimAuth::Bearer { token }, None) => request.bearer_auth(token.expose()),
            (ScimAuth::ApiKey { header, api_key }, None) => match HeaderValue::from_str(api_key.expose()) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    request.header(header.as_str(), value)
                }
                Err(_) => request,
            },
        }
    }

    fn user_name(&self, user: &User) -> String {
        let (domain_in_name, bare_name) = match user.user_name.split_once('/') {
            Some((domain, name)) => (Some(domain), name),
            None => (None, user.user_name.as_str()),
        };
        match self.settings.user_store_domain {
            UserStoreDomainHandling::Strip => bare_name.to_string(),
            UserStoreDomainHandling::Keep => match domain_in_name.or(user.user_store_domain.as_deref()) {
                Some(domain) if !domain.eq_ignore_ascii_case("PRIMARY") => format!("{domain}/{bare_name}"),
                _ => bare_name.to_string(),
            },
        }
    }

    fn password(&self) -> Option<Secret> {
        match self.settings.password {
            PasswordProvisioning::None => None,
            PasswordProvisioning::Default => self.settings.default_password.clone(),
            PasswordProvisioning::Random => Some(random_password()),
        }
    }

    /// The attributes we own on the target, as (SCIM path, value).
    fn desired_attributes(&self, user: &User) -> Vec<(String, Value)> {
        let mut attributes = vec![
            ("userName".to_string(), Value::String(self.user_name(user))),
            ("externalId".to_string(), Value::String(user.id.clone())),
            ("active".to_string(), Value::Bool(user.active.unwrap_or(true))),
        ];
        if let Some(name) = &user.name {
            if let Some(given_name) = &name.given_name {
                attributes.push(("name.givenName".into(), Value::String(given_name.clone())));
            }
            if let Some(family_name) = &name.family_name {
                attributes.push(("name.familyName".into(), Value::String(family_name.clone())));
            }
            let display_name = [name.given_name.as_deref(), name.family_name.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            if !display_name.is_empty() {
                attributes.push(("displayName".into(), Value::String(display_name)));
            }
        }
        if !user.emails.is_empty() {
            let emails: Vec<Value> = user
                .emails
                .iter()
                .enumerate()
                .map(|(index, email)| {
                    json!({
                        "value": email.value,
                        "type": "work",
                        "primary": email.primary.unwrap_or(index == 0 && !user.emails.iter().any(|e| e.primary == Some(true))),
                    })
                })
                .collect();
            attributes.push(("emails".into(), Value::Array(emails)));
        }
        if !self.settings.attributes.is_empty() {
            let source = serde_json::to_value(user).unwrap_or(Value::Null);
            for (target, source_path) in &self.settings.attributes {
                let found = source_path
                    .split('.')
                    .try_fold(&source, |node, segment| node.get(segment));
                if let Some(value) = found.filter(|value| !value.is_null()) {
                    attributes.retain(|(path, _)| path != target);
                    attributes.push((target.clone(), value.clone()));
                }
            }
        }
        attributes
    }

    /// A full User resource holding `attributes`.
    fn resource(&self, attributes: &[(String, Value)]) -> Value {
        let mut resource = json!({"schemas": [USER_SCHEMA]});
        overlay(&mut resource, attributes);
        resource
    }
}

/// A SCIM answer: success is one of the statuses the request expects; errors carry the
/// SCIM Error schema.
struct Expecting<'a>(&'a [StatusCode]);

impl Target for Expecting<'_> {
    fn is_success(&self, status: StatusCode) -> bool {
        self.0.contains(&status)
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError {
        status_error(status, headers, scim_error_message(status, body))
    }
}

impl Connector for ScimConnector {
    fn apply<'a>(&'a self, change: UserChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_change(&change).await })
    }

    fn apply_group<'a>(&'a self, change: GroupChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_group_change(&change).await })
    }

    fn apply_members<'a>(&'a self, change: MembersChange<'a>) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move { self.apply_members_change(&change).await })
    }

    fn max_members_per_request(&self) -> usize {
        // `check` refuses 0; settings built without it must not make batches of nothing.
        self.settings.max_members_per_request.max(1)
    }
}

/// Writes each (path, value) into a resource: `a.b` nests, `urn:…:Attr` goes into the
/// extension object (and its schema is listed).
pub fn overlay(resource: &mut Value, attributes: &[(String, Value)]) {
    let Value::Object(root) = resource else {
        return;
    };
    for (path, value) in attributes {
        match path.rsplit_once(':') {
            Some((schema, attribute)) if path.starts_with("urn:") => {
                if let Some(Value::Array(schemas)) = root.get_mut("schemas") {
                    if !schemas.iter().any(|listed| listed == schema) {
                        schemas.push(Value::String(schema.to_string()));
                    }
                }
                let extension = root
                    .entry(schema.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(extension) = extension {
                    insert_path(extension, attribute, value);
                }
            }
            _ => insert_path(root, path, value),
        }
    }
}

fn insert_path(object: &mut Map<String, Value>, path: &str, value: &Value) {
    match path.split_once('.') {
        None => {
            object.insert(path.to_string(), value.clone());
        }
        Some((head, rest)) => {
            let child = object
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            if let Value::Object(child) = child {
                insert_path(child, rest, value);
            }
        }
    }
}

fn join_path(base: &Url, segment: &str) -> Url {
    let mut url = base.clone();
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().push(segment);
    }
    url
}

fn with_if_match(request: RequestBuilder, version: Option<&str>) -> RequestBuilder {
    match version {
        Some(version) => request.header(IF_MATCH, version),
        None => request,
    }
}

/// A PatchOp request (RFC 7644 §3.5.2) carrying `operations`.
fn patch_request(operations: Vec<Value>) -> Value {
    json!({"schemas": [PATCH_SCHEMA], "Operations": operations})
}

/// A resource as read, ready to be PUT back: `meta` is the server's (read-only).
fn without_meta(mut resource: Value) -> Value {
    if let Value::Object(object) = &mut resource {
        object.remove("meta");
    }
    resource
}

/// Compares as SCIM does for attributes that are not `caseExact` (`userName`,
/// `displayName`), Unicode included.
fn equal_ignoring_case(left: &str, right: &str) -> bool {
    left == right || left.to_lowercase() == right.to_lowercase()
}

/// A SCIM filter string literal: JSON string syntax (RFC 7644 §3.4.2.2), so quotes and
/// backslashes in user values are escaped, never interpreted.
pub fn filter_literal(value: &str) -> String {
    Value::String(value.to_string()).to_string()
}

fn remote_resource(resource: &Value) -> Result<RemoteResource, ConnectorError> {
    Ok(RemoteResource {
        id: resource_id(resource)?,
        version: resource
            .pointer("/meta/version")
            .and_then(Value::as_str)
            .map(str::to_string),
        resource: resource.clone(),
    })
}

fn resource_id(resource: &Value) -> Result<String, ConnectorError> {
    resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ConnectorError::InvalidResponse {
            status: None,
            message: "the SCIM resource has no id".into(),
        })
}

/// Parses the SCIM Error schema (`status`, `scimType`, `detail`) into a message.
fn scim_error_message(status: StatusCode, body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(error) => {
            let scim_type = error.get("scimType").and_then(Value::as_str);
            let detail = error.get("detail").and_then(Value::as_str).unwrap_or("no detail given");
            match scim_type {
                Some(scim_type) => format!("scimType {scim_type}: {detail}"),
                None => detail.to_string(),
            }
        }
        Err(_) if body.is_empty() => format!("HTTP {}", status.as_u16()),
        Err(_) => body.to_string(),
    }
}

/// 409, or a 400 whose SCIM error says uniqueness (some servers get the status wrong).
fn is_uniqueness_conflict(error: &ConnectorError) -> bool {
    match error {
        ConnectorError::Rejected { status: 409, .. } => true,
        ConnectorError::Rejected { status: 400, message } => {
            let message = message.to_ascii_lowercase();
            message.contains("scimtype uniqueness") || message.contains("already exists")
        }
        _ => false,
    }
}

/// 24 characters from letters, digits and symbols (~145 bits), fresh per user, with
/// every class present for servers that enforce composition rules.
fn random_password() -> Secret {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789!#$%&*+-=?@^_";
    let pick = Uniform::new(0, ALPHABET.len()).expect("non-empty alphabet");
    let mut rng = rand::rng();
    loop {
        let password: String = (0..24).map(|_| ALPHABET[pick.sample(&mut rng)] as char).collect();
        let has_every_class = password.chars().any(|c| c.is_ascii_uppercase())
            && password.chars().any(|c| c.is_ascii_lowercase())
            && password.chars().any(|c| c.is_ascii_digit())
            && password.chars().any(|c| !c.is_ascii_alphanumeric());
        if has_every_class {
            return Secret::new(password);
        }
    }
}

/// For the registry: build behind an `Arc<dyn Connector>`.
pub fn build(name: &str, settings: &Scim2Settings) -> Result<Arc<dyn Connector>, BuildError> {
    Ok(Arc::new(ScimConnector::new(name, settings)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_literals_escape_quotes_and_backslashes() {
        assert_eq!(filter_literal("alice"), "\"alice\"");
        assert_eq!(
            filter_literal("a\" or userName pr or \"b"),
            "\"a\\\" or userName pr or \\\"b\""
        );
        assert_eq!(filter_literal("back\\slash"), "\"back\\\\slash\"");
    }

    #[test]
    fn overlay_nests_paths_and_extension_attributes() {
        let mut resource = json!({"schemas": [USER_SCHEMA], "id": "1", "nickName": "kept"});
        overlay(
            &mut resource,
            &[
                ("name.givenName".into(), json!("Alice")),
                (
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department".into(),
                    json!("Sales"),
                ),
            ],
        );
        assert_eq!(resource["name"]["givenName"], "Alice");
        assert_eq!(resource["nickName"], "kept");
        assert_eq!(
            resource["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["department"],
            "Sales"
        );
        assert_eq!(resource["schemas"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn random_passwords_are_strong_and_fresh() {
        let first = random_password();
        let second = random_password();
        assert_ne!(first.expose(), second.expose());
        let password = first.expose();
        assert_eq!(password.len(), 24);
        assert!(password.chars().any(|c| c.is_ascii_uppercase()));
        assert!(password.chars().any(|c| c.is_ascii_lowercase()));
        assert!(password.chars().any(|c| c.is_ascii_digit()));
        assert!(password.chars().any(|c| !c.is_ascii_alphanumeric()));
    }

    #[test]
    fn uniqueness_is_recognised_in_409_and_in_400() {
        assert!(is_uniqueness_conflict(&ConnectorError::Rejected {
            status: 409,
            message: String::new()
        }));
        assert!(is_uniqueness_conflict(&ConnectorError::Rejected {
            status: 400,
            message: "scimType uniqueness: userName taken".into()
        }));
        assert!(!is_uniqueness_conflict(&ConnectorError::Rejected {
            status: 400,
            message: "scimType invalidValue: bad".into()
        }));
    }

    #[test]
    fn user_ids_with_separators_stay_one_path_segment() {
        let settings: Scim2Settings =
            serde_json::from_value(json!({"base_url": "http://127.0.0.1:1/scim/v2/"})).unwrap();
        let connector = ScimConnector::new("t", &settings).unwrap();
        assert_eq!(connector.users.url.as_str(), "http://127.0.0.1:1/scim/v2/Users");
        assert_eq!(
            connector.users.resource_url("../../Groups/x?y").as_str(),
            "http://127.0.0.1:1/scim/v2/Users/..%2F..%2FGroups%2Fx%3Fy"
        );
        assert_eq!(
            connector.service_provider_config_url.as_str(),
            "http://127.0.0.1:1/scim/v2/ServiceProviderConfig"
        );
    }

    #[test]
    fn the_groups_endpoint_comes_from_groups_url_else_base_url_else_beside_users_url() {
        let groups_url = |settings: Value| {
            let settings: Scim2Settings = serde_json::from_value(settings).unwrap();
            ScimConnector::new("t", &settings).unwrap().groups.url.to_string()
        };
        assert_eq!(
            groups_url(json!({"base_url": "http://127.0.0.1:1/scim/v2/"})),
            "http://127.0.0.1:1/scim/v2/Groups"
        );
        assert_eq!(
            groups_url(json!({"users_url": "https://wso2.example/scim2/Users"})),
            "https://wso2.example/scim2/Groups"
        );
        assert_eq!(
            groups_url(json!({
                "base_url": "http://127.0.0.1:1/scim/v2",
                "groups_url": "https://wso2.example/t/acme/scim2/Groups"
            })),
            "https://wso2.example/t/acme/scim2/Groups"
        );
    }

    #[test]
    fn lookups_compare_case_as_the_attribute_does() {
        let external_id = Lookup {
            attribute: "externalId",
            value: "G-1",
            case_exact: true,
        };
        assert!(external_id.matches(&json!({"externalId": "G-1"})));
        assert!(!external_id.matches(&json!({"externalId": "g-1"})));
        let display_name = Lookup {
            attribute: "displayName",
            value: "Équipe \"Ops\"",
            case_exact: false,
        };
        assert!(display_name.matches(&json!({"displayName": "équipe \"OPS\""})));
        assert!(!display_name.matches(&json!({"displayName": "Équipe"})));
        assert_eq!(display_name.filter(), r#"displayName eq "Équipe \"Ops\"""#);
    }
}
